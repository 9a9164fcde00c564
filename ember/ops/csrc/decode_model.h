// The whole decoder stack for a batch of single-token decodes, in one call (bound in bindings.cpp).
#pragma once
#include "common.h"

#include <vector>

// A linear layer as the decode path sees it: float32 weights (bits 32) or packed int8 / int4.
struct DecodeLinear {
  int64_t bits;
  torch::Tensor w, scales, mins, bias;  // undefined (numel 0) where absent
  int64_t N, K;

  DecodeLinear(int64_t bits_, torch::Tensor w_, torch::Tensor s, torch::Tensor m, torch::Tensor b)
      : bits(bits_), w(w_.contiguous()), scales(s.contiguous()), mins(m.contiguous()), bias(b.contiguous()) {
    TORCH_CHECK(bits == 32 || bits == 8 || bits == 4, "bits must be 32, 8 or 4");
    N = w.size(0);
    if (bits == 32) {
      TORCH_CHECK(w.dtype() == torch::kFloat32);
      K = w.size(1);
    } else {
      K = check_packed(w, scales, bits == 4 ? &mins : nullptr, (int)bits);
    }
    TORCH_CHECK(bias.numel() == 0 || (bias.dtype() == torch::kFloat32 && bias.numel() == N));
  }

  // y [M, N] = x [M, K] . W^T + bias (all contiguous).
  void run(const float* x, int64_t M, float* y) const {
    const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
    if (bits == 32) {
      auto xt = torch::from_blob((void*)x, {M, K}, torch::kFloat32);
      auto yt = torch::from_blob(y, {M, N}, torch::kFloat32);
      if (b) at::addmm_out(yt, bias, xt, w.t());
      else at::mm_out(yt, xt, w.t());
      return;
    }
    wxa8_any(x, M, K, w.data_ptr(), scales, bits == 4 ? &mins : nullptr, b, N, (int)bits, y, N);
  }
};

struct DecodeLayer {
  torch::Tensor in_norm, post_norm;
  DecodeLinear qkv, o, gate_up, down;
};

// Holds references to a model's weights; forward() runs every layer for B decode tokens without
// returning to Python (the per-op dispatch of ~15 ops x layers is most of a small model's step).
class DecodeModel {
 public:
  DecodeModel(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, torch::Tensor final_norm)
      : H(heads), KVH(kv_heads), D(head_dim), eps((float)eps), final_norm(final_norm.contiguous()) {}

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, DecodeLinear qkv, DecodeLinear o,
                 DecodeLinear gate_up, DecodeLinear down) {
    TORCH_CHECK(qkv.N == (H + 2 * KVH) * D && o.K == H * D && gate_up.N == 2 * down.K, "layer shapes");
    layers.push_back(DecodeLayer{in_norm.contiguous(), post_norm.contiguous(), qkv, o, gate_up, down});
  }

  // x [B, hidden] embeddings; cos/sin [B, D]; caches[i] [2, blocks, block_size, KVH, D] float32 or float16;
  // slots [B]; tables [B, W]; ctx_lens [B] (including this token); starts [B] or None: row b sees keys t < sink
  // and starts[b] <= t (None: all of its context). alone: each row's attention as a one-row call computes it
  // (how the work is split depends on the rows in a call, and with it the rounding), so a sequence's rows
  // checking speculative candidates give the bits its one-token steps would. skip: uint8 [2 * layers] or None,
  // sub-layers left out (2i: layer i's attention, which then writes no KV; 2i + 1: its MLP), as a
  // self-speculative drafter runs. Returns the final-normed hidden states.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> caches,
                        torch::Tensor slots, torch::Tensor tables, torch::Tensor ctx_lens, double scale,
                        c10::optional<torch::Tensor> starts, int64_t sink, bool alone,
                        c10::optional<torch::Tensor> skip) {
    TORCH_CHECK(caches.size() == layers.size());
    tables = tables.contiguous(); slots = slots.contiguous(); ctx_lens = ctx_lens.contiguous();
    const torch::Tensor window = window_starts(starts, ctx_lens, sink);
    const int64_t kv_size = KVH * D;
    const int64_t* SL = slots.data_ptr<int64_t>();
    torch::Tensor skips;
    if (skip.has_value()) {
      skips = skip->contiguous();
      TORCH_CHECK(skips.dtype() == torch::kUInt8 && skips.numel() == 2 * (int64_t)layers.size(), "skip: uint8 [2L]");
    }
    return run(x, cos, sin, skips.defined() ? skips.data_ptr<uint8_t>() : nullptr,
               [&](size_t i, float* QKV, int64_t B, int64_t ld, float* A) {
      torch::Tensor& cache = caches[i];
      TORCH_CHECK(cache.is_contiguous() && cache.size(2) * cache.size(1) > 0);
      const int64_t plane = cache.size(1) * cache.size(2) * kv_size;
      with_cache_type(cache, [&](auto* type) {
        using T = std::remove_pointer_t<decltype(type)>;
        T* KC = (T*)cache.data_ptr();
        for (int64_t b = 0; b < B; ++b) {  // new K and V into their slots
          store_row(QKV + b * ld + H * D, KC + SL[b] * kv_size, kv_size);
          store_row(QKV + b * ld + H * D + kv_size, KC + plane + SL[b] * kv_size, kv_size);
        }
        const int64_t *TB = tables.data_ptr<int64_t>(), *LN = ctx_lens.data_ptr<int64_t>(), W = tables.size(1);
        const int64_t* ST = starts_ptr(window);
        const PagedKV<T> kv{KC, KC + plane, TB, LN, W, cache.size(2), KVH, D, ST, sink};
        if (alone) decode_attention_alone_raw(QKV, B, H, ld, kv, (float)scale, A);
        else decode_attention_raw(QKV, B, H, ld, kv, (float)scale, A);
      });
    });
  }

  // As forward over KIVI caches (each a QuantKVCache's 7 tensors): each new K/V goes to the residual at
  // flat index res_index[b] (slot * block_size + offset); tables [B, W] are the full blocks, res_slots [B]
  // the slots; starts, sink: as forward. Blocks that fill are quantized afterwards, in Python.
  torch::Tensor forward_kivi(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                             std::vector<std::vector<torch::Tensor>> caches, torch::Tensor res_index,
                             torch::Tensor tables, torch::Tensor ctx_lens, torch::Tensor res_slots, int64_t bits,
                             double scale, c10::optional<torch::Tensor> starts, int64_t sink) {
    TORCH_CHECK(caches.size() == layers.size());
    tables = tables.contiguous(); res_index = res_index.contiguous(); ctx_lens = ctx_lens.contiguous();
    res_slots = res_slots.contiguous();
    const torch::Tensor window = window_starts(starts, ctx_lens, sink);
    const int64_t kv_size = KVH * D;
    const int64_t* RI = res_index.data_ptr<int64_t>();
    return run(x, cos, sin, nullptr, [&](size_t i, float* QKV, int64_t B, int64_t ld, float* A) {
      const KiviKV kv = kivi_view(caches[i], tables, ctx_lens, res_slots, bits, starts_ptr(window), sink);
      float *RK = const_cast<float*>(kv.RK), *RV = const_cast<float*>(kv.RV);
      for (int64_t b = 0; b < B; ++b) {
        std::copy_n(QKV + b * ld + H * D, kv_size, RK + RI[b] * kv_size);
        std::copy_n(QKV + b * ld + H * D + kv_size, kv_size, RV + RI[b] * kv_size);
      }
      kivi_decode_attention_raw(QKV, B, H, ld, kv, (float)scale, A);
    });
  }

 private:
  // Every layer for B decode tokens; attend(layer, QKV, B, ld, A) stores the new K/V and writes attention
  // outputs [B, H*D] to A. skip (2 per layer: attention, MLP) or nullptr: sub-layers left out.
  template <typename Attend>
  torch::Tensor run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, const uint8_t* skip, Attend attend) {
    TORCH_CHECK(x.dtype() == torch::kFloat32);
    x = x.contiguous().clone();
    cos = cos.contiguous(); sin = sin.contiguous();
    const int64_t B = x.size(0), hidden = x.size(1), q_size = H * D, kv_size = KVH * D;
    const int64_t inter = layers.empty() ? 0 : layers[0].down.K;
    auto h = torch::empty({B, hidden}), t = torch::empty({B, hidden});
    auto qkv = torch::empty({B, q_size + 2 * kv_size}), attn = torch::empty({B, q_size});
    auto gu = torch::empty({B, 2 * inter}), act = torch::empty({B, inter});
    float *X = x.data_ptr<float>(), *Hb = h.data_ptr<float>(), *Tb = t.data_ptr<float>();
    float *QKV = qkv.data_ptr<float>(), *A = attn.data_ptr<float>(), *GU = gu.data_ptr<float>(), *ACT = act.data_ptr<float>();
    const int64_t ld = q_size + 2 * kv_size;
    for (size_t i = 0; i < layers.size(); ++i) {
      const DecodeLayer& L = layers[i];
      if (!skip || !skip[2 * i]) {
        rms_norm_raw(X, L.in_norm.data_ptr<float>(), B, hidden, eps, Hb);
        L.qkv.run(Hb, B, QKV);
        rope_raw(QKV, B, H, D, ld, cos.data_ptr<float>(), sin.data_ptr<float>());
        rope_raw(QKV + q_size, B, KVH, D, ld, cos.data_ptr<float>(), sin.data_ptr<float>());
        attend(i, QKV, B, ld, A);
        L.o.run(A, B, Tb);
        for (int64_t j = 0; j < B * hidden; ++j) X[j] += Tb[j];
      }
      if (skip && skip[2 * i + 1]) continue;
      rms_norm_raw(X, L.post_norm.data_ptr<float>(), B, hidden, eps, Hb);
      L.gate_up.run(Hb, B, GU);
      silu_mul_raw(GU, B, inter, ACT);
      L.down.run(ACT, B, Tb);
      for (int64_t j = 0; j < B * hidden; ++j) X[j] += Tb[j];
    }
    rms_norm_raw(X, final_norm.data_ptr<float>(), B, hidden, eps, Hb);
    return h;
  }

  int64_t H, KVH, D;
  float eps;
  torch::Tensor final_norm;
  std::vector<DecodeLayer> layers;
};
