// Shared by ember's CPU kernel files: includes, the activation block size, float helpers, the caches' views,
// and the functions one file calls in another (ember/ops/kernels.py builds them as one extension).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <utility>

static constexpr int G = 32;  // activation block

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EMBER_VNNI 1  // 256-bit vpdpbusd (ember/ops/kernels.py compiles it in where the CPU has it)
#endif

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Float32 or float16 operands (group parameters: llama.cpp's choice, 5 bits per weight at int4 g32; a
// float16 KV cache: llama.cpp's default), read as float32.
static inline float to_f32(float v) { return v; }
static inline float to_f32(at::Half v) { return _cvtsh_ss(v.x); }
static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_f32(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

template <typename T>
static inline float dot_f32(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8_f32(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * to_f32(b[i]);
  return r;
}

// Paged KV cache geometry: K and V planes of [blocks, block_size, KVH, D] elements.
template <typename T>  // float or at::Half
struct PagedKV {
  const T *K, *V;
  const int64_t* tables;  // [B, W] block ids
  const int64_t* lens;    // [B] context lengths
  int64_t W, BS, KVH, D;
  const int64_t* starts;  // [B] key windows (see Hidden), or nullptr: every key of the context
  int64_t sink;
};

// The keys a window hides from one row: [lo, hi), empty (lo == hi == 0) without a window. Row b sees keys
// t < sink and t >= starts[b] of its context (attention sinks plus a recent window); callers guarantee
// starts[b] < lens[b], so a row always sees at least its own key.
struct Hidden {
  int64_t lo = 0, hi = 0;

  bool empty() const { return lo >= hi; }
  // The visible parts of [t0, t1): [t0, min(t1, lo)) and [max(t0, hi), t1), either possibly empty; without a
  // window, the first is empty and the second is [t0, t1).
  std::array<std::pair<int64_t, int64_t>, 2> split(int64_t t0, int64_t t1) const {
    return {{{t0, std::min(t1, lo)}, {std::max(t0, hi), t1}}};
  }
  // This range relative to a piece [t0, t0 + n) of the context, clipped to it.
  Hidden within(int64_t t0, int64_t n) const {
    if (empty()) return {};
    return {std::clamp<int64_t>(lo - t0, 0, n), std::clamp<int64_t>(hi - t0, 0, n)};
  }
  // Keys of a context of len that stay visible.
  int64_t visible(int64_t len) const { return len - (std::min(hi, len) - std::min(lo, len)); }
};

// Row b's hidden keys, for a PagedKV or a KiviKV.
template <typename KV>
static inline Hidden hidden_keys(const KV& kv, int64_t b) {
  if (!kv.starts || kv.starts[b] <= kv.sink) return {};
  return {kv.sink, kv.starts[b]};
}

// The window's starts, checked (int64 [B], starts[b] in [0, lens[b])), or an undefined tensor without one.
static inline torch::Tensor window_starts(const c10::optional<torch::Tensor>& starts, const torch::Tensor& lens,
                                          int64_t sink) {
  TORCH_CHECK(sink >= 0, "sink must be >= 0");
  if (!starts.has_value() || !starts->defined()) return torch::Tensor();
  torch::Tensor s = starts->contiguous();
  TORCH_CHECK(s.dtype() == torch::kInt64 && s.dim() == 1 && s.size(0) == lens.size(0),
              "starts must be int64 [B], one per row");
  const int64_t *sp = s.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.size(0); ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] < lp[b], "starts[", b, "] = ", sp[b], " must be in [0, lens[b] = ", lp[b], ")");
  return s;
}

static inline const int64_t* starts_ptr(const torch::Tensor& s) { return s.defined() ? s.data_ptr<int64_t>() : nullptr; }


template <typename T>
static inline void axpy_f32(float p, const T* x, float* y, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, load8_f32(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * to_f32(x[i]);
}

// e^x for 8 floats: Cephes' range reduction and polynomial (as avx_mathfun), ~1 ulp on softmax inputs.
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// In place: s[0..n) <- exp(s - mx); returns the sum.
static float exp_shifted(float* s, int64_t n, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; t < n; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
  return sum;
}

// In place: s[0..n) <- exp(s - max(s)); returns the sum, and the max in *max_out.
static float exp_inplace(float* s, int64_t n, float* max_out) {
  float mx = s[0];
  for (int64_t t = 1; t < n; ++t) mx = std::max(mx, s[t]);
  *max_out = mx;
  return exp_shifted(s, n, mx);
}

// As exp_inplace over the scores a window leaves visible (all but s[x.lo .. x.hi), which are neither read nor
// written: masked keys, as if their scores were -inf). With none visible: max -inf, sum 0.
static float exp_visible(float* s, int64_t n, Hidden x, float* max_out) {
  if (x.empty() && n > 0) return exp_inplace(s, n, max_out);
  const auto parts = x.split(0, n);
  float mx = -INFINITY, sum = 0.f;
  for (auto [t0, t1] : parts)
    for (int64_t t = t0; t < t1; ++t) mx = std::max(mx, s[t]);
  *max_out = mx;
  for (auto [t0, t1] : parts)
    if (t1 > t0) sum += exp_shifted(s + t0, t1 - t0, mx);
  return sum;
}

// In place: s[0..n) <- softmax(s).
static void softmax_inplace(float* s, int64_t n) {
  float mx;
  const float inv = 1.f / exp_inplace(s, n, &mx);
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
}

// In place: the visible scores of s[0..n) <- their softmax (the hidden ones are left as they are).
static void softmax_visible(float* s, int64_t n, Hidden x) {
  if (x.empty()) return softmax_inplace(s, n);
  float mx;
  const float inv = 1.f / exp_visible(s, n, x, &mx);
  for (auto [t0, t1] : x.split(0, n))
    for (int64_t t = t0; t < t1; ++t) s[t] *= inv;
}

// Calls f with the cache tensor's element type as a null pointer of it: float32 or float16.
template <typename F>
static void with_cache_type(const torch::Tensor& cache, F f) {
  TORCH_CHECK(cache.dtype() == torch::kFloat32 || cache.dtype() == torch::kFloat16, "KV cache must be float32 or float16");
  if (cache.dtype() == torch::kFloat16) f((at::Half*)nullptr);
  else f((float*)nullptr);
}


// n floats into a float32 or float16 cache row (float16 rounded to nearest even, as tensor.to(float16)).
static inline void store_row(const float* src, float* dst, int64_t n) { std::copy_n(src, n, dst); }
static inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = at::Half(src[i]);
}

struct KiviKV {
  const uint8_t *KC, *VC;    // [blocks, BS, KVH, Wb] codes; planar: bits [i*b, (i+1)*b) of byte j = dim i*Wb + j
  const at::Half *KS, *KM;   // [blocks, KVH, D] key scale / min (per channel over the block)
  const at::Half *VS, *VM;   // [blocks, BS, KVH] value scale / min (per token)
  const float *RK, *RV;      // residual [slots, BS, KVH, D]
  const int64_t* tables;     // [B, W] full blocks
  const int64_t* lens;       // [B] context length, this token included (it is in the residual)
  const int64_t* slots;      // [B] residual slot holding the block still filling
  int64_t W, BS, KVH, D, bits;
  const int64_t* starts;     // [B] key windows (see Hidden), or nullptr
  int64_t sink;
};

// Defined in quant_gemm.cpp.
int64_t check_packed(const torch::Tensor& wq, const torch::Tensor& ws, const torch::Tensor* wm, int bits);
void wxa8_any(const float* x, int64_t M, int64_t K, const void* wq, const torch::Tensor& ws,
              const torch::Tensor* wm, const float* bias, int64_t N, int bits, float* y, int64_t ldy);
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws);
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor wm);
void dequantize_into(torch::Tensor wq, torch::Tensor ws, torch::Tensor wm, int64_t bits, torch::Tensor out);

// Defined in small_ops.cpp.
void rms_norm_raw(const float* X, const float* W, int64_t T, int64_t D, float eps, float* O);
void silu_mul_raw(const float* GU, int64_t T, int64_t I, float* O);
void rope_raw(float* X, int64_t T, int64_t H, int64_t D, int64_t ld, const float* C, const float* S);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor gu);
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

// Defined in paged_attention.cpp (instantiated for float and at::Half caches).
template <typename T>
void decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv, float scale,
                          float* O);
// As a decode_attention_raw call per row (speculative candidates' rows; see DecodeModel::forward), in one go.
template <typename T>
void decode_attention_alone_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv, float scale,
                                float* O);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor ctx_lens, double scale,
                                     c10::optional<torch::Tensor> starts, int64_t sink);

// Defined in kivi.cpp.
KiviKV kivi_view(const std::vector<torch::Tensor>& c, const torch::Tensor& tables, const torch::Tensor& lens,
                 const torch::Tensor& slots, int64_t bits, const int64_t* starts, int64_t sink);
void kivi_decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const KiviKV& kv, float scale,
                               float* O);
torch::Tensor kivi_decode_attention(torch::Tensor q, std::vector<torch::Tensor> cache, torch::Tensor tables,
                                    torch::Tensor lens, torch::Tensor slots, int64_t bits, double scale,
                                    c10::optional<torch::Tensor> starts, int64_t sink);
