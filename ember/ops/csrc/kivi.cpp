// KIVI cache: full blocks as packed codes (keys per channel, values per token), newest tokens in float.
#include "common.h"

// codes of one (token, head) row -> out[0..D) as floats.
static inline void unpack_codes_f32(const uint8_t* src, int64_t D, int bits, float* out) {
  if (bits == 8) {
    for (int64_t d = 0; d < D; ++d) out[d] = (float)src[d];
    return;
  }
  const int per = 8 / bits, mask = (1 << bits) - 1;
  const int64_t Wb = D / per;
  for (int i = 0; i < per; ++i)
    for (int64_t j = 0; j < Wb; ++j) out[i * Wb + j] = (float)((src[j] >> (bits * i)) & mask);
}

// One block of one head dequantized into buf [BS, D]: keys (per-channel parameters) or values (per token).
static void kivi_block(const KiviKV& kv, bool keys, int64_t blk, int64_t h, float* buf, float* s, float* m) {
  const int64_t BS = kv.BS, D = kv.D, Wb = D * kv.bits / 8;
  const uint8_t* codes = (keys ? kv.KC : kv.VC) + (blk * BS * kv.KVH + h) * Wb;
  if (keys) {
    const at::Half *ks = kv.KS + (blk * kv.KVH + h) * D, *km = kv.KM + (blk * kv.KVH + h) * D;
    for (int64_t d = 0; d < D; ++d) { s[d] = (float)ks[d]; m[d] = (float)km[d]; }
  }
  for (int64_t t = 0; t < BS; ++t, codes += kv.KVH * Wb) {
    float* row = buf + t * D;
    unpack_codes_f32(codes, D, (int)kv.bits, row);
    if (keys) {
      for (int64_t d = 0; d < D; ++d) row[d] = row[d] * s[d] + m[d];
    } else {
      const int64_t i = (blk * BS + t) * kv.KVH + h;
      const float vs = (float)kv.VS[i], vm = (float)kv.VM[i];
      for (int64_t d = 0; d < D; ++d) row[d] = row[d] * vs + vm;
    }
  }
}

// As decode_attention_raw, over a KIVI cache: each full block is dequantized into a small buffer (L1) once
// per head and shared by the group's query heads; the residual block is read as float. Key t is token t of
// the context: full block t / BS, then the residual block. Keys a row's window hides are skipped: blocks it
// hides whole are not dequantized, and within the others its hidden tokens are neither scored nor added.
void kivi_decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const KiviKV& kv,
                                      float scale, float* O) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D;
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, buf(BS * D), s(D), m(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, h = i % KVH, p = kv.lens[b] - 1;
      const int64_t full = p / BS, rest = p % BS + 1, len = full * BS + rest;
      const int64_t* table = kv.tables + b * kv.W;
      const float* rk = kv.RK + (kv.slots[b] * BS * KVH + h) * D;
      const float* rv = kv.RV + (kv.slots[b] * BS * KVH + h) * D;
      const float* qb = Q + b * ldq + h * group * D;
      const Hidden x = hidden_keys(kv, b);
      auto hidden_block = [&](int64_t j) { return x.lo <= j * BS && (j + 1) * BS <= x.hi; };
      scores.resize(group * len);
      for (int64_t j = 0; j < full; ++j) {
        if (hidden_block(j)) continue;
        kivi_block(kv, true, table[j], h, buf.data(), s.data(), m.data());
        for (auto [t0, t1] : x.split(j * BS, (j + 1) * BS))
          for (int64_t t = t0 - j * BS; t < t1 - j * BS; ++t)
            for (int64_t g = 0; g < group; ++g)
              scores[g * len + j * BS + t] = dot_f32(qb + g * D, buf.data() + t * D, D) * scale;
      }
      for (auto [t0, t1] : x.split(full * BS, len))
        for (int64_t t = t0 - full * BS; t < t1 - full * BS; ++t)
          for (int64_t g = 0; g < group; ++g)
            scores[g * len + full * BS + t] = dot_f32(qb + g * D, rk + t * row, D) * scale;
      for (int64_t g = 0; g < group; ++g) softmax_visible(scores.data() + g * len, len, x);
      float* ob = O + (b * H + h * group) * D;
      std::fill(ob, ob + group * D, 0.f);
      for (int64_t j = 0; j < full; ++j) {
        if (hidden_block(j)) continue;
        kivi_block(kv, false, table[j], h, buf.data(), s.data(), m.data());
        for (auto [t0, t1] : x.split(j * BS, (j + 1) * BS))
          for (int64_t t = t0 - j * BS; t < t1 - j * BS; ++t)
            for (int64_t g = 0; g < group; ++g)
              axpy_f32(scores[g * len + j * BS + t], buf.data() + t * D, ob + g * D, D);
      }
      for (auto [t0, t1] : x.split(full * BS, len))
        for (int64_t t = t0 - full * BS; t < t1 - full * BS; ++t)
          for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * len + full * BS + t], rv + t * row, ob + g * D, D);
    }
  });
}

// A QuantKVCache's tensors, in ember.ops.kv_quant's order:
// [k_codes, k_scale, k_min, v_codes, v_scale, v_min, residual].
KiviKV kivi_view(const std::vector<torch::Tensor>& c, const torch::Tensor& tables, const torch::Tensor& lens,
                        const torch::Tensor& slots, int64_t bits, const int64_t* starts, int64_t sink) {
  TORCH_CHECK(c.size() == 7, "a KIVI cache is 7 tensors");
  for (const auto& t : c) TORCH_CHECK(t.is_contiguous(), "KIVI cache tensors must be contiguous");
  TORCH_CHECK(c[0].dtype() == torch::kUInt8 && c[1].dtype() == torch::kFloat16 && c[6].dtype() == torch::kFloat32);
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "KV bits must be 8, 4 or 2");
  TORCH_CHECK(tables.dtype() == torch::kInt64 && lens.dtype() == torch::kInt64 && slots.dtype() == torch::kInt64);
  const int64_t D = c[1].size(2);
  TORCH_CHECK(c[0].size(3) * 8 == D * bits, "codes width does not match head_dim and bits");
  return KiviKV{c[0].data_ptr<uint8_t>(), c[3].data_ptr<uint8_t>(), c[1].data_ptr<at::Half>(),
                c[2].data_ptr<at::Half>(), c[4].data_ptr<at::Half>(), c[5].data_ptr<at::Half>(),
                c[6].data_ptr<float>(), c[6].data_ptr<float>() + c[6].numel() / 2, tables.data_ptr<int64_t>(),
                lens.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), tables.size(1), c[0].size(1), c[0].size(2),
                D, bits, starts, sink};
}

// q [B, H, D]; cache: a QuantKVCache's tensors; tables [B, W] full blocks; lens [B]; slots [B]; starts [B]
// or None: row b sees keys t < sink and starts[b] <= t < lens[b] (None: all of its context).
torch::Tensor kivi_decode_attention(torch::Tensor q, std::vector<torch::Tensor> cache, torch::Tensor tables,
                                    torch::Tensor lens, torch::Tensor slots, int64_t bits, double scale,
                                    c10::optional<torch::Tensor> starts, int64_t sink) {
  TORCH_CHECK(q.dtype() == torch::kFloat32);
  q = q.contiguous(); tables = tables.contiguous(); lens = lens.contiguous(); slots = slots.contiguous();
  const torch::Tensor window = window_starts(starts, lens, sink);
  auto out = torch::empty_like(q);
  const KiviKV kv = kivi_view(cache, tables, lens, slots, bits, starts_ptr(window), sink);
  kivi_decode_attention_raw(q.data_ptr<float>(), q.size(0), q.size(1), q.size(1) * q.size(2), kv, (float)scale,
                            out.data_ptr<float>());
  return out;
}
