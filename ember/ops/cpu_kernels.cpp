// CPU kernels for ember's decode path (ember/ops/kernels.py builds this with torch's cpp_extension).
// Quantized linear layers: weights int8 [N, K] (symmetric) or int4 packed [N, K/2] (asymmetric,
// w = q * scale + min), with one scale (and min) per group of `group` inputs along K. Activations are
// quantized on the fly to int8 per block of 32, and each block's dot product runs on AVX2 integer
// multiply-adds (as llama.cpp's q8_0 / q4_1 x q8 dots), then is scaled and accumulated in float.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <type_traits>

static constexpr int G = 32;  // activation block

// Activations [M, K] quantized per block of 32: q = round(x / s), s = max|x| / 127; sum = s * sum(q).
struct QuantAct {
  torch::Tensor q, s, sum;
};

// One block of 32: q = round-to-nearest-even(x * (1 / s)), as the scalar std::nearbyint under the default
// rounding mode; returns sum(q). Eight lanes at a time: at one activation row this ran serially before
// every projection (48 blocks for SmolLM2's down_proj) and showed in the step time.
static inline int quantize_block(const float* src, float inv, int8_t* dst) {
  __m256i q[4];
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * j), _mm256_set1_ps(inv)));
  // pack 32 int32 -> 32 int8 (values are within [-127, 127]); packs interleave 128-bit lanes, the permute undoes it
  const __m256i w16 = _mm256_packs_epi32(q[0], q[1]), w16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)dst, b8);
  const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

static inline float block_amax(const float* src) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(src));
  for (int j = 1; j < 4; ++j) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + 8 * j)));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

static QuantAct quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / G;
  QuantAct a{torch::empty({M, K}, torch::kInt8), torch::empty({M, blocks}, torch::kFloat32),
             torch::empty({M, blocks}, torch::kFloat32)};
  int8_t* Q = a.q.data_ptr<int8_t>();
  float *S = a.s.data_ptr<float>(), *SUM = a.sum.data_ptr<float>();
  at::parallel_for(0, M * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // block i starts at float i * G (rows are whole blocks)
      const float scale = block_amax(x + i * G) / 127.f;
      const float inv = scale > 0.f ? 1.f / scale : 0.f;
      S[i] = scale;
      SUM[i] = scale * (float)quantize_block(x + i * G, inv, Q + i * G);
    }
  });
  return a;
}

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

// Load 32 int4 codes of one block (16 bytes) as 32 bytes 0..15 in block order.
static inline __m256i load_u4(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

template <int BITS>
static inline __m256i load_block(const uint8_t* wrow, int64_t b) {
  return BITS == 4 ? load_u4(wrow + b * G / 2) : _mm256_loadu_si256((const __m256i*)(wrow + b * G));
}

// One block's integer dot as 8 float lanes. int8: maddubs needs an unsigned operand, so |x| (`ax`, hoisted:
// it serves every weight row) times w with x's sign; int4 codes are unsigned already (no saturation:
// 2 * 15 * 127 fits in int16).
template <int BITS>
static inline __m256 block_dot(__m256i xv, __m256i ax, __m256i wv) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (BITS == 4) return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones));
}

// The int4 mins' share of one output: sum over groups of min_g * (sum of the dequantized x in group g).
template <typename P>
static float mins_share(const P* mrow, const float* gsum, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(load8_f32(mrow + g), _mm256_loadu_ps(gsum + g), acc);
  float r = hsum(acc);
  for (; g < groups; ++g) r = std::fma(to_f32(mrow[g]), gsum[g], r);  // explicit: pair_dot_per1 must round alike
  return r;
}

// How every path accumulates one (weight row, activation row) pair, so that a row's result does not
// depend on how many rows share the call: with one activation block per weight group (PER1), each block
// is scaled by x_scale * w_scale; with several, blocks are summed with their x scales and each group's
// sum is scaled by its w scale once. Then the lanes are summed, plus the mins' share and the bias.
template <int BITS, bool PER1, int R, int C, typename P>
static void dot_tile(const uint8_t* const* w, const P* const* ws, const int8_t* x, const float* xs, int64_t K,
                     int64_t groups, int64_t per, float* out) {
  const int64_t blocks = K / G;
  __m256 acc[R][C], gacc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0, b = 0; g < groups; ++g) {
    __m256 wsv[R];
    for (int r = 0; r < R; ++r) wsv[r] = _mm256_set1_ps(to_f32(ws[r][g]));
    if (!PER1)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) gacc[r][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < (PER1 ? 1 : per); ++j, ++b) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load_block<BITS>(w[r], b);
      for (int c = 0; c < C; ++c) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + c * K + b * G));
        const __m256i ax = BITS == 4 ? xv : _mm256_sign_epi8(xv, xv);
        const __m256 xsv = _mm256_broadcast_ss(xs + c * blocks + b);
        for (int r = 0; r < R; ++r) {
          const __m256 d = block_dot<BITS>(xv, ax, wv[r]);
          if (PER1) acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(xsv, wsv[r]), d, acc[r][c]);
          else gacc[r][c] = _mm256_fmadd_ps(xsv, d, gacc[r][c]);
        }
      }
    }
    if (!PER1)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wsv[r], gacc[r][c], acc[r][c]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = hsum(acc[r][c]);
}

// dot_tile<BITS, true, 2, 1> plus the int4 mins' share, for one activation row against two weight rows,
// with the per-block scale products x_scale * w_scale and the mins' share formed eight blocks at a time
// before the dot loop instead of a scalar half-to-float per block (1.5-1.8x faster at one row, measured on
// SmolLM2's shapes; calling mins_share afterwards, through wxa8_rows' finish, measured 2-8% slower in
// decode). Same operations per pair in the same order as dot_tile and mins_share, so the results are
// bit-identical to the tiled path.
template <int BITS, typename P>
static void pair_dot_per1(const uint8_t* const* w, const P* const* ws, const P* const* wm, const int8_t* x,
                          const float* xs, const float* gsum, int64_t blocks, int64_t ahead, float* out) {
  constexpr int64_t CHUNK = 64;  // blocks whose scale products sit in a stack buffer at a time
  alignas(32) float cs0[CHUNK], cs1[CHUNK];
  // Named accumulators, not arrays: GCC kept an array of them on the stack, putting a store and a
  // reload on every block's dependency chain (half the speed).
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, macc0 = acc0, macc1 = acc0;
  const uint8_t *w0 = w[0], *w1 = w[1];
  for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
    const int64_t n = std::min(CHUNK, blocks - b0);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 xsv = _mm256_loadu_ps(xs + b0 + j);
      _mm256_store_ps(cs0 + j, _mm256_mul_ps(xsv, load8_f32(ws[0] + b0 + j)));
      _mm256_store_ps(cs1 + j, _mm256_mul_ps(xsv, load8_f32(ws[1] + b0 + j)));
      if (BITS == 4) {
        const __m256 gs = _mm256_loadu_ps(gsum + b0 + j);
        macc0 = _mm256_fmadd_ps(load8_f32(wm[0] + b0 + j), gs, macc0);
        macc1 = _mm256_fmadd_ps(load8_f32(wm[1] + b0 + j), gs, macc1);
      }
    }
    for (; j < n; ++j) {
      cs0[j] = xs[b0 + j] * to_f32(ws[0][b0 + j]);
      cs1[j] = xs[b0 + j] * to_f32(ws[1][b0 + j]);
    }
    for (j = 0; j < n; ++j) {
      const int64_t b = b0 + j;
      if (b % (16 / BITS) == 0) {  // once per cache line of each row
        _mm_prefetch((const char*)(w0 + b * BITS * 4 + ahead), _MM_HINT_T0);
        _mm_prefetch((const char*)(w1 + b * BITS * 4 + ahead), _MM_HINT_T0);
      }
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + b * G));
      const __m256i ax = BITS == 4 ? xv : _mm256_sign_epi8(xv, xv);
      acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs0 + j), block_dot<BITS>(xv, ax, load_block<BITS>(w0, b)), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs1 + j), block_dot<BITS>(xv, ax, load_block<BITS>(w1, b)), acc1);
    }
  }
  float mins0 = 0.f, mins1 = 0.f;
  if (BITS == 4) {  // mins_share's order: eight lanes over whole octets of blocks, then the rest
    mins0 = hsum(macc0);
    mins1 = hsum(macc1);
    for (int64_t g = blocks - blocks % 8; g < blocks; ++g) {
      mins0 = std::fma(to_f32(wm[0][g]), gsum[g], mins0);
      mins1 = std::fma(to_f32(wm[1][g]), gsum[g], mins1);
    }
  }
  out[0] = hsum(acc0) + mins0;
  out[1] = hsum(acc1) + mins1;
}

// Activations quantized to int8 per block of 32, integer dots against the packed weights: memory-bound
// at a few rows, compute-bound beyond, where 2 (weight rows) x 4 (activation rows) tiles reuse each
// loaded block.
template <int BITS, bool PER1, typename P>
static void wxa8_rows(const QuantAct& a, int64_t M, int64_t K, const void* wq, const P* ws, const P* wm,
                      const float* bias, int64_t N, int64_t group, float* y, int64_t ldy) {
  const int64_t blocks = K / G, groups = K / group, per = group / G;
  const int64_t row_bytes = BITS == 4 ? K / 2 : K;
  const int8_t* X = a.q.data_ptr<int8_t>();
  const float *XS = a.s.data_ptr<float>(), *XSUM = a.sum.data_ptr<float>();
  std::vector<float> gsum(BITS == 4 ? M * groups : 0);  // per activation row and weight group
  for (int64_t i = 0; i < (int64_t)gsum.size(); ++i) {
    float t = 0.f;
    for (int64_t j = 0; j < per; ++j) t += XSUM[(i / groups) * blocks + (i % groups) * per + j];
    gsum[i] = t;
  }
  auto row = [&](int64_t n) { return (const uint8_t*)wq + n * row_bytes; };
  auto finish = [&](int64_t n, int64_t m, float dot) {
    const float mins = BITS == 4 ? mins_share(wm + n * groups, gsum.data() + m * groups, groups) : 0.f;
    y[m * ldy + n] = dot + mins + (bias ? bias[n] : 0.f);
  };
  const int64_t tiled_m = M < 4 ? 0 : M - M % 4;
  // The few-rows path prefetches at least the next pair's rows ahead of the dot: without it a thread
  // streamed 576 x 1536 int4 from memory at 7 GB/s, with it 12 (576 x 3072: 11.4 -> 13).
  const int64_t ahead = std::max<int64_t>(2 * row_bytes, 1024);
  at::parallel_for(0, (N + 1) / 2, M < 4 ? 8 : 2, [&](int64_t p0, int64_t p1) {
    float out[8];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 2 * p, rows = std::min<int64_t>(2, N - n);
      const uint8_t* w[2] = {row(n), row(n + rows - 1)};
      const P* s[2] = {ws + n * groups, ws + (n + rows - 1) * groups};
      for (int64_t m = 0; m < tiled_m; m += 4) {
        dot_tile<BITS, PER1, 2, 4>(w, s, X + m * K, XS + m * blocks, K, groups, per, out);
        for (int64_t r = 0; r < rows; ++r)
          for (int i = 0; i < 4; ++i) finish(n + r, m + i, out[4 * r + i]);
      }
      // The last 1-3 rows after tiles run as one narrower tile (the pair's weight rows are in L1 by now):
      // row by row, each cost as much as a whole tile's four (per-channel int8, 30 layers: 11 rows 20.0 ->
      // 17.5 ms, 12 rows 18.0). A lone row with one block per group stays on pair_dot_per1 (measured faster).
      const int64_t tail = M - tiled_m;
      if (tiled_m && (tail >= 2 || (tail == 1 && !PER1))) {
        const int8_t* xm = X + tiled_m * K;
        const float* xsm = XS + tiled_m * blocks;
        if (tail == 1) dot_tile<BITS, PER1, 2, 1>(w, s, xm, xsm, K, groups, per, out);
        else if (tail == 2) dot_tile<BITS, PER1, 2, 2>(w, s, xm, xsm, K, groups, per, out);
        else dot_tile<BITS, PER1, 2, 3>(w, s, xm, xsm, K, groups, per, out);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < tail; ++i) finish(n + r, tiled_m + i, out[tail * r + i]);
        continue;
      }
      for (int64_t m = tiled_m; m < M; ++m) {
        const int8_t* xm = X + m * K;
        const float* xsm = XS + m * blocks;
        if (PER1) {  // both rows at once: two accumulation chains in flight (measured faster for int4)
          const P* mins[2] = {BITS == 4 ? wm + n * groups : nullptr, BITS == 4 ? wm + (n + rows - 1) * groups : nullptr};
          pair_dot_per1<BITS, P>(w, s, mins, xm, xsm, BITS == 4 ? gsum.data() + m * groups : nullptr, blocks, ahead, out);
          for (int64_t r = 0; r < rows; ++r) y[m * ldy + n + r] = out[r] + (bias ? bias[n + r] : 0.f);
          continue;
        }
        // one row at a time: one sequential stream from memory (per-channel int8, measured again with
        // both rows' accumulators in registers and prefetching: 2 threads 23.5 GB/s one row, 17.5 two)
        for (int64_t r = 0; r < rows; ++r) dot_tile<BITS, PER1, 1, 1>(w + r, s + r, xm, xsm, K, groups, per, out + r);
        for (int64_t r = 0; r < rows; ++r) finish(n + r, m, out[r]);
      }
    }
  });
}

// Raw y [M, N] = x [M, K] . W^T (+ bias); bits 8 (mins == nullptr) or 4. Rows of y are `ldy` apart.
template <typename P>
static void wxa8_raw(const float* x, int64_t M, int64_t K, const void* wq, const P* ws, const P* wm,
                     const float* bias, int64_t N, int64_t group, int bits, float* y, int64_t ldy) {
  const QuantAct a = quantize_rows(x, M, K);
  const bool per1 = group == G;
  if (bits == 4) (per1 ? wxa8_rows<4, true, P> : wxa8_rows<4, false, P>)(a, M, K, wq, ws, wm, bias, N, group, y, ldy);
  else (per1 ? wxa8_rows<8, true, P> : wxa8_rows<8, false, P>)(a, M, K, wq, ws, wm, bias, N, group, y, ldy);
}

// As wxa8_raw for parameter tensors of either dtype (see check_packed).
static void wxa8_any(const float* x, int64_t M, int64_t K, const void* wq, const torch::Tensor& ws,
                     const torch::Tensor* wm, const float* bias, int64_t N, int bits, float* y, int64_t ldy) {
  const int64_t group = K / ws.size(1);
  if (ws.dtype() == torch::kFloat16)
    wxa8_raw(x, M, K, wq, ws.data_ptr<at::Half>(), wm ? wm->data_ptr<at::Half>() : nullptr, bias, N, group, bits, y, ldy);
  else
    wxa8_raw(x, M, K, wq, ws.data_ptr<float>(), wm ? wm->data_ptr<float>() : nullptr, bias, N, group, bits, y, ldy);
}

// Checks a packed weight (int8 [N, K], or int4 [N, K/2] with mins) and its group scales [N, K/group];
// returns K.
static int64_t check_packed(const torch::Tensor& wq, const torch::Tensor& ws, const torch::Tensor* wm, int bits) {
  const int64_t N = wq.size(0), K = bits == 4 ? wq.size(1) * 2 : wq.size(1);
  TORCH_CHECK(wq.is_contiguous() && wq.dtype() == (bits == 4 ? torch::kUInt8 : torch::kInt8));
  TORCH_CHECK((ws.dtype() == torch::kFloat32 || ws.dtype() == torch::kFloat16) && ws.is_contiguous(),
              "group scales must be float32 or float16");
  TORCH_CHECK(K % G == 0 && ws.size(0) == N && K % ws.size(1) == 0 && (K / ws.size(1)) % G == 0,
              "group size must be a multiple of 32 dividing K");
  if (bits == 4)
    TORCH_CHECK(wm && wm->dtype() == ws.dtype() && wm->is_contiguous() && wm->sizes() == ws.sizes(),
                "int4 mins must match the scales' shape and dtype");
  return K;
}

// y [M, N] = x [M, K] . w^T for a packed weight (see check_packed).
static torch::Tensor packed_linear(torch::Tensor x, const torch::Tensor& wq, const torch::Tensor& ws,
                                   const torch::Tensor* wm, int bits) {
  const int64_t K = check_packed(wq, ws, wm, bits), N = wq.size(0);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K);
  x = x.contiguous();
  auto y = torch::empty({x.size(0), N}, torch::kFloat32);
  wxa8_any(x.data_ptr<float>(), x.size(0), K, wq.data_ptr(), ws, wm, nullptr, N, bits, y.data_ptr<float>(), N);
  return y;
}

// int8 w [N, K] with group scales ws [N, K/group].
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws) {
  return packed_linear(x, wq, ws, nullptr, 8);
}

// int4 w packed [N, K/2] with group scales and mins [N, K/group].
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor wm) {
  return packed_linear(x, wq, ws, &wm, 4);
}

// 32 codes of one block as float32, four registers of eight (int8: signed; int4: load_u4's order).
template <int BITS>
static inline void block_f32(const uint8_t* wrow, int64_t b, __m256* out) {
  const __m256i v = load_block<BITS>(wrow, b);
  for (int i = 0; i < 4; ++i) {
    const __m128i eight = _mm_loadl_epi64((const __m128i*)((const uint8_t*)&v + 8 * i));
    out[i] = _mm256_cvtepi32_ps(BITS == 4 ? _mm256_cvtepu8_epi32(eight) : _mm256_cvtepi8_epi32(eight));
  }
}

// w [N, K] = q * scale (+ min) for a packed weight, as ember.ops.quant.dequantize computes it (a multiply,
// then an add: the same float32 results), into `out`, which the caller reuses: a fresh 7 MB tensor per
// call cost more in page faults than the conversion (SmolLM2's gate_up: 5.1 ms of 5.6 a layer).
template <int BITS, typename P>
static void dequantize_raw(const uint8_t* wq, const P* ws, const P* wm, int64_t N, int64_t K, int64_t group, float* out) {
  const int64_t groups = K / group, per = group / G, row_bytes = BITS == 4 ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    __m256 v[4];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0, b = 0; g < groups; ++g) {
        const __m256 sv = _mm256_set1_ps(to_f32(ws[n * groups + g]));
        const __m256 mv = _mm256_set1_ps(BITS == 4 ? to_f32(wm[n * groups + g]) : 0.f);
        for (int64_t j = 0; j < per; ++j, ++b) {
          block_f32<BITS>(wq + n * row_bytes, b, v);
          float* o = out + n * K + b * G;
          for (int i = 0; i < 4; ++i) {
            const __m256 w = _mm256_mul_ps(v[i], sv);
            _mm256_storeu_ps(o + 8 * i, BITS == 4 ? _mm256_add_ps(w, mv) : w);
          }
        }
      }
    }
  });
}

// out [N, K] float32 (contiguous) from a packed weight (see check_packed); mins empty for int8.
void dequantize_into(torch::Tensor wq, torch::Tensor ws, torch::Tensor wm, int64_t bits, torch::Tensor out) {
  const int64_t K = check_packed(wq, ws, bits == 4 ? &wm : nullptr, (int)bits), N = wq.size(0);
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == N * K, "out must be float32 [N, K]");
  const int64_t group = K / ws.size(1);
  const uint8_t* q = (const uint8_t*)wq.data_ptr();
  float* o = out.data_ptr<float>();
  if (ws.dtype() == torch::kFloat16) {
    const at::Half *s = ws.data_ptr<at::Half>(), *m = bits == 4 ? wm.data_ptr<at::Half>() : nullptr;
    (bits == 4 ? dequantize_raw<4, at::Half> : dequantize_raw<8, at::Half>)(q, s, m, N, K, group, o);
  } else {
    const float *s = ws.data_ptr<float>(), *m = bits == 4 ? wm.data_ptr<float>() : nullptr;
    (bits == 4 ? dequantize_raw<4, float> : dequantize_raw<8, float>)(q, s, m, N, K, group, o);
  }
}

// ---- small fused float32 ops for the decode path (each replaces several PyTorch ops) ----

// out = x * rsqrt(mean(x^2) + eps) * w, per row of x [T, D].
static void rms_norm_raw(const float* X, const float* W, int64_t T, int64_t D, float eps, float* O) {
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = X + t * D;
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * xr[i];
      const float r = 1.f / std::sqrt((float)(ss / D) + eps);
      float* o = O + t * D;
      for (int64_t i = 0; i < D; ++i) o[i] = W[i] * (xr[i] * r);
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32);
  x = x.contiguous();
  const int64_t D = x.size(-1);
  auto out = torch::empty_like(x);
  rms_norm_raw(x.data_ptr<float>(), w.data_ptr<float>(), x.numel() / D, D, (float)eps, out.data_ptr<float>());
  return out;
}

// silu(g) * u for rows [gate | up] of width 2I; writes rows of width I.
static inline __m256 exp256(__m256 x);

static void silu_mul_raw(const float* GU, int64_t T, int64_t I, float* O) {
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const float *g = GU + t * 2 * I, *u = g + I;
      float* o = O + t * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {  // g / (1 + exp(-g)) * u, eight lanes at a time
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dtype() == torch::kFloat32);
  gu = gu.contiguous();
  const int64_t I = gu.size(-1) / 2, T = gu.numel() / (2 * I);
  auto out = torch::empty({T, I}, gu.options());
  silu_mul_raw(gu.data_ptr<float>(), T, I, out.data_ptr<float>());
  return out;
}

// Rotary embedding in place (half-split layout) on T rows of H heads x D, rows `ld` floats apart.
static void rope_raw(float* X, int64_t T, int64_t H, int64_t D, int64_t ld, const float* C, const float* S) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float *c = C + t * D, *s = S + t * D;
    for (int64_t h = 0; h < H; ++h) {
      float* v = X + t * ld + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// In-place rotary embedding on x [T, H, D] with cos/sin [T, D].
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous());
  const int64_t H = x.size(1), D = x.size(2);
  rope_raw(x.data_ptr<float>(), x.size(0), H, D, H * D, cos.data_ptr<float>(), sin.data_ptr<float>());
}

// Every cache line of the D elements at p: one head's key row for single decode rows (a head's rows are
// KVH * D apart: the first line alone left decode steps of 16 sequences ~5% slower; 8 rows ahead measured
// best of 2 to 16; the same for values measured slower, for one sequence and for 16), or a whole cache
// row for seq_attention.
template <typename T>
static inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t c = 0; c < D * (int64_t)sizeof(T); c += 64) _mm_prefetch((const char*)p + c, _MM_HINT_T0);
}

// Paged KV cache geometry: K and V planes of [blocks, block_size, KVH, D] elements.
template <typename T>  // float or at::Half
struct PagedKV {
  const T *K, *V;
  const int64_t* tables;  // [B, W] block ids
  const int64_t* lens;    // [B] context lengths
  int64_t W, BS, KVH, D;
};

// Whether seq_partial can read this cache's rows whole (every KV head in one pass): head size a multiple of 64.
template <typename T>
static inline bool whole_rows(const PagedKV<T>& kv) { return kv.D % 64 == 0; }

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

// In place: s[0..n) <- exp(s - max(s)); returns the sum, and the max in *max_out.
static float exp_inplace(float* s, int64_t n, float* max_out) {
  float mx = s[0];
  for (int64_t t = 1; t < n; ++t) mx = std::max(mx, s[t]);
  *max_out = mx;
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

// In place: s[0..n) <- softmax(s).
static void softmax_inplace(float* s, int64_t n) {
  float mx;
  const float inv = 1.f / exp_inplace(s, n, &mx);
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
}

// out[0..64) = sum over t in [begin, end) of p[t - begin] * V[t] for one KV head, in eight registers.
template <typename T>
static void attend_v64(const float* p, int64_t begin, int64_t end, const PagedKV<T>& kv, const int64_t* table,
                       int64_t h, float* out) {
  const int64_t row = kv.KVH * kv.D;
  __m256 a[8];
  for (auto& r : a) r = _mm256_setzero_ps();
  for (int64_t t0 = begin; t0 < end;) {
    const T* v = kv.V + ((table[t0 / kv.BS] * kv.BS + t0 % kv.BS) * kv.KVH + h) * kv.D;
    const int64_t t1 = std::min(end, (t0 / kv.BS + 1) * kv.BS);
    for (int64_t t = t0; t < t1; ++t, v += row) {
      _mm_prefetch((const char*)(v + 4 * row), _MM_HINT_T0);
      const __m256 pt = _mm256_set1_ps(p[t - begin]);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(pt, load8_f32(v + 8 * j), a[j]);
    }
    t0 = t1;
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + 8 * j, a[j]);
}

// Scores of NQ <= 4 queries (rows of D floats, D a multiple of 8) against one key: each eight key lanes are
// loaded once for all of them, and the four sums are reduced together (three hadds), not one by one.
template <int NQ, typename T>
static inline __m128 qk_scores(const float* const* q, const T* k, int64_t D) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < D; c += 8) {
    const __m256 kc = load8_f32(k + c);
    for (int i = 0; i < NQ; ++i) s[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + c), kc, s[i]);
  }
  const __m256 h4 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1));
}

// Scores of `n` (1..4) query heads, q[i] D floats each, against one key, times `scale`, into s[i * len + t].
template <typename T>
static inline void score_heads(const float* const* q, int n, const T* k, int64_t D, float scale, float* s,
                               int64_t len, int64_t t) {
  alignas(16) float four[4];
  const __m128 sum = n == 4 ? qk_scores<4>(q, k, D) : n == 3 ? qk_scores<3>(q, k, D)
                   : n == 2 ? qk_scores<2>(q, k, D) : qk_scores<1>(q, k, D);
  _mm_store_ps(four, _mm_mul_ps(sum, _mm_set1_ps(scale)));
  for (int i = 0; i < n; ++i) s[i * len + t] = four[i];
}

// Scores of the `group` query heads of one KV head (rows of D floats from qb) against one key, times
// `scale`, into s[g * len + t]; four heads per key load where D allows.
template <typename T>
static inline void score_group(const float* qb, int64_t group, const T* k, int64_t D, float scale, float* s,
                               int64_t len, int64_t t) {
  if (D % 8) {
    for (int64_t g = 0; g < group; ++g) s[g * len + t] = dot_f32(qb + g * D, k, D) * scale;
    return;
  }
  for (int64_t j = 0; j < group; j += 4) {
    const int n = (int)std::min<int64_t>(4, group - j);
    const float* q[4];
    for (int i = 0; i < 4; ++i) q[i] = qb + (j + std::min(i, n - 1)) * D;
    score_heads(q, n, k, D, scale, s + j * len, len, t);
  }
}

// One query token per sequence attending to its context straight from the paged cache (no gather).
// Q rows are `ldq` floats apart (H heads x D each); O is [B, H, D]. Walks the block table block by block.
template <typename T>
static void decode_attention_split(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                                   float scale, int64_t pieces, float* O);
template <typename T>
static int64_t context_pieces(int64_t B, const PagedKV<T>& kv);

// One row (one query token, `group` query heads) against KV head h of its context.
template <typename T>
static void row_attention(const float* Q, int64_t b, int64_t H, int64_t ldq, const PagedKV<T>& kv, int64_t h,
                          float scale, float* O, std::vector<float>& scores) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, len = kv.lens[b];
  const int64_t* table = kv.tables + b * kv.W;
  scores.resize(group * len);
  const float* qb = Q + b * ldq + h * group * D;
  for (int64_t t0 = 0; t0 < len; t0 += BS) {
    const T* k = kv.K + (table[t0 / BS] * BS * KVH + h) * D;
    const int64_t t1 = std::min(len, t0 + BS);
    for (int64_t t = t0; t < t1; ++t, k += row) {
      prefetch_row(k + 8 * row, D);
      score_group(qb, group, k, D, scale, scores.data(), len, t);
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_inplace(scores.data() + g * len, len);
  float* ob = O + (b * H + h * group) * D;
  if (D == 64) {  // the common head size: the output row lives in registers across the context
    for (int64_t g = 0; g < group; ++g) attend_v64(scores.data() + g * len, 0, len, kv, table, h, ob + g * D);
    return;
  }
  std::fill(ob, ob + group * D, 0.f);
  for (int64_t t0 = 0; t0 < len; t0 += BS) {
    const T* v = kv.V + (table[t0 / BS] * BS * KVH + h) * D;
    for (int64_t t = t0; t < std::min(len, t0 + BS); ++t, v += row)
      for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * len + t], v, ob + g * D, D);
  }
}

// Tokens [t0, t1) of one decode row (query heads qb, H x D) against every KV head at once: each token's
// cache row (KVH x D contiguous elements) is read once, in order, and the row `ahead` tokens on is
// prefetched through the block table (the next block is rarely the next in memory). Per query head j:
// m[j] = max score, l[j] = sum of exp(score - m[j]), acc[j * D ..] = sum of exp(score - m[j]) * V, the
// value rows accumulated in L1 (all H x D of them do not fit in registers). (Sequence, head) items each
// read a third of every row, strided: 16 sequences of 314 tokens, 30 layers, one thread, 31 -> 21 ms
// (float16: 19 -> 13). D must be a multiple of 64.
template <typename T>
static void seq_partial(const float* qb, int64_t H, const PagedKV<T>& kv, const int64_t* table, int64_t t0,
                        int64_t t1, float scale, std::vector<float>& S, float* m, float* l, float* acc) {
  constexpr int64_t ahead = 4;
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, n = t1 - t0;
  auto at = [&](const T* plane, int64_t t) { return plane + (table[t / BS] * BS + t % BS) * row; };
  S.resize(H * n);
  for (int64_t t = t0; t < t1; ++t) {
    if (t + ahead < t1) prefetch_row(at(kv.K, t + ahead), row);
    const T* k = at(kv.K, t);
    for (int64_t h = 0; h < KVH; ++h)  // query heads h * group .. of KV head h
      score_group(qb + h * group * D, group, k + h * D, D, scale, &S[h * group * n], n, t - t0);
  }
  for (int64_t j = 0; j < H; ++j) l[j] = exp_inplace(&S[j * n], n, &m[j]);
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t t = t0; t < t1; ++t) {
    if (t + ahead < t1) prefetch_row(at(kv.V, t + ahead), row);
    const T* v = at(kv.V, t);
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t c = 0; c < D; c += 64) {
        __m256 vv[8];
        for (int i = 0; i < 8; ++i) vv[i] = load8_f32(v + h * D + c + 8 * i);
        for (int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
          const __m256 p = _mm256_broadcast_ss(&S[qh * n + t - t0]);
          float* o = acc + qh * D + c;
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(p, vv[i], _mm256_loadu_ps(o + 8 * i)));
        }
      }
  }
}

// One decode row against its whole context, every KV head at once (seq_partial over all of it, normalised).
template <typename T>
static void seq_attention(const float* Q, int64_t b, int64_t H, int64_t ldq, const PagedKV<T>& kv, float scale,
                          float* O, std::vector<float>& S) {
  std::vector<float> ml(2 * H);
  float* ob = O + b * H * kv.D;
  seq_partial(Q + b * ldq, H, kv, kv.tables + b * kv.W, 0, kv.lens[b], scale, S, ml.data(), ml.data() + H, ob);
  for (int64_t j = 0; j < H; ++j) {
    const __m256 w = _mm256_set1_ps(1.f / ml[H + j]);
    for (int64_t c = 0; c < kv.D; c += 8)
      _mm256_storeu_ps(ob + j * kv.D + c, _mm256_mul_ps(_mm256_loadu_ps(ob + j * kv.D + c), w));
  }
}

// Scores of NK keys (k[i], D floats each) for QV x 8 queries held transposed (qt[c * ld + 8 * v + lane] =
// query lane's element c): each key element is broadcast once to all the queries, and every sum builds up
// in its own lane, so no horizontal reduction is needed. s[i * ld + 8 * v + lane] gets key i's scores;
// only the first nk keys are stored. NK x QV accumulators must stay in registers (<= 9 of 16).
constexpr int QK_KEYS = 3;

template <int QV>
static inline void qk_tile(const float* qt, int64_t ld, const float* const* k, int64_t D, float* s, int nk) {
  __m256 acc[QK_KEYS][QV];
#pragma GCC unroll 16
  for (int i = 0; i < QK_KEYS; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < QV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; ++c) {
    __m256 q[QV];
#pragma GCC unroll 16
    for (int v = 0; v < QV; ++v) q[v] = _mm256_loadu_ps(qt + c * ld + 8 * v);
#pragma GCC unroll 16
    for (int i = 0; i < QK_KEYS; ++i) {
      const __m256 kb = _mm256_broadcast_ss(k[i] + c);
#pragma GCC unroll 16
      for (int v = 0; v < QV; ++v) acc[i][v] = _mm256_fmadd_ps(kb, q[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < QK_KEYS; ++i)
    if (i < nk)
#pragma GCC unroll 16
      for (int v = 0; v < QV; ++v) _mm256_storeu_ps(s + i * ld + 8 * v, acc[i][v]);
}

// For NQ queries j: o[j][c .. c + 16) (+)= sum over t in [t0, t1) of p[t * ld + j] * V(t)[c .. c + 16), added
// to what o holds unless `first`. Twelve accumulators, two value registers and a weight: all in registers.
template <int NQ, typename T>
static inline void pv_tile(const float* p, int64_t ld, const T* V, const int64_t* offs, int64_t t0, int64_t t1,
                           int64_t c, bool first, float* const* o) {
  __m256 lo[NQ], hi[NQ];
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i) {
    lo[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o[i] + c);
    hi[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o[i] + c + 8);
  }
  p += t0 * ld;
  for (int64_t t = t0; t < t1; ++t, p += ld) {
    const T* v = V + offs[t] + c;
    const __m256 vl = load8_f32(v), vh = load8_f32(v + 8);
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const __m256 w = _mm256_broadcast_ss(p + i);
      lo[i] = _mm256_fmadd_ps(w, vl, lo[i]);
      hi[i] = _mm256_fmadd_ps(w, vh, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i) {
    _mm256_storeu_ps(o[i] + c, lo[i]);
    _mm256_storeu_ps(o[i] + c + 8, hi[i]);
  }
}

// Rows b0 .. b0 + R - 1 are consecutive tokens of one sequence (a prompt chunk run as one-query rows: row r
// attends to lens[b0] + r tokens), against KV head h: a small GEMM with the R x group queries in vector
// lanes. Scores land as S[t][query], so each key element is broadcast once to up to 24 queries, the softmax
// runs down columns with no horizontal sums, and the causal mask is a lane compare on the last R - 1 keys;
// values go to six queries per load. Query-per-dot scoring (four heads per key load, summed across lanes)
// ran at ~19 cycles per (query, key) pair, this at ~11 (16 rows at position 700, one thread: 643 -> 381 us
// a layer). D must be a multiple of 16.
template <typename T>
static void run_attention(const float* Q, int64_t b0, int64_t R, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                          int64_t h, float scale, float* O, std::vector<float>& S) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, nq = R * group;
  const int64_t L0 = kv.lens[b0], len = L0 + R - 1, NV = (nq + 7) / 8, ld = NV * 8;
  const int64_t* table = kv.tables + b0 * kv.W;
  std::vector<int64_t> offs(len);  // element offset of token t's row for head h, in either plane
  for (int64_t t0 = 0; t0 < len; t0 += BS) {
    const int64_t base = (table[t0 / BS] * BS * KVH + h) * D;
    for (int64_t t = t0; t < std::min(len, t0 + BS); ++t) offs[t] = base + (t - t0) * row;
  }
  S.resize(ld * D + ld * len + QK_KEYS * D + ld);
  float *qt = S.data(), *sc = qt + ld * D, *kf = sc + ld * len, *inv = kf + QK_KEYS * D;
  std::fill(qt, qt + ld * D, 0.f);  // padding lanes score 0 and are never written out
  for (int64_t j = 0; j < nq; ++j) {
    const float* q = Q + (b0 + j / group) * ldq + (h * group + j % group) * D;
    for (int64_t c = 0; c < D; ++c) qt[c * ld + j] = q[c] * scale;
  }
  for (int64_t t = 0; t < len; t += QK_KEYS) {
    const int nk = (int)std::min<int64_t>(QK_KEYS, len - t);
    const float* k[QK_KEYS];
    for (int i = 0; i < QK_KEYS; ++i) {
      const T* src = kv.K + offs[t + std::min(i, nk - 1)];
      if (t + QK_KEYS + i < len) prefetch_row(kv.K + offs[t + QK_KEYS + i], D);
      if constexpr (std::is_same_v<T, float>) {
        k[i] = src;
      } else {
        for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(kf + i * D + c, load8_f32(src + c));
        k[i] = kf + i * D;
      }
    }
    for (int64_t v = 0; v < NV; v += 3) {
      float* s = sc + t * ld + 8 * v;
      switch (std::min<int64_t>(3, NV - v)) {
        case 3: qk_tile<3>(qt + 8 * v, ld, k, D, s, nk); break;
        case 2: qk_tile<2>(qt + 8 * v, ld, k, D, s, nk); break;
        default: qk_tile<1>(qt + 8 * v, ld, k, D, s, nk);
      }
    }
  }
  // Softmax down each query's column; query j (row j / group) sees keys t < L0 + j / group.
  for (int64_t v = 0; v < NV; ++v) {
    alignas(32) float rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = (float)std::min(R, (8 * v + i) / group);  // padding: sees all
    const __m256 r = _mm256_load_ps(rows);
    auto seen = [&](int64_t t) { return _mm256_cmp_ps(r, _mm256_set1_ps((float)(t - L0)), _CMP_GT_OQ); };
    __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      __m256 x = _mm256_loadu_ps(sc + t * ld + 8 * v);
      if (t >= L0) x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, seen(t));
      mx = _mm256_max_ps(mx, x);
    }
    for (int64_t t = 0; t < len; ++t) {
      float* x = sc + t * ld + 8 * v;
      __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x), mx));
      if (t >= L0) e = _mm256_and_ps(e, seen(t));
      _mm256_storeu_ps(x, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(inv + 8 * v, _mm256_div_ps(_mm256_set1_ps(1.f), sum));
  }
  // Values in blocks of PV_TOKENS tokens (16 KB of a 64-wide head), which stay in L1 for all the query tiles
  // and column slices; walking the whole context per tile and slice read them from L2 each time (the case
  // above: 411 -> 381 us).
  constexpr int64_t PV_TOKENS = 64;
  float* o[6];
  for (int64_t t0 = 0; t0 < len; t0 += PV_TOKENS) {
    for (int64_t j0 = 0; j0 < nq; j0 += 6) {
      const int n = (int)std::min<int64_t>(6, nq - j0);
      const int64_t t1 = std::min(t0 + PV_TOKENS, L0 + (j0 + n - 1) / group);  // the tile's longest context
      if (t1 <= t0) continue;
      for (int i = 0; i < n; ++i) o[i] = O + ((b0 + (j0 + i) / group) * H + h * group + (j0 + i) % group) * D;
      const float* p = sc + j0;
      for (int64_t c = 0; c < D; c += 16) switch (n) {
        case 6: pv_tile<6>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o); break;
        case 5: pv_tile<5>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o); break;
        case 4: pv_tile<4>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o); break;
        case 3: pv_tile<3>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o); break;
        case 2: pv_tile<2>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o); break;
        default: pv_tile<1>(p, ld, kv.V, offs.data(), t0, t1, c, t0 == 0, o);
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j) {
    float* out = O + ((b0 + j / group) * H + h * group + j % group) * D;
    const __m256 w = _mm256_set1_ps(inv[j]);
    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(out + c), w));
  }
}

// Items of different sizes, (work, id), shared out by work: longest first onto the least loaded thread, so each
// thread gets about equal work (a contiguous slice of items put 8 long contexts on one thread and 8 short ones
// on the other). Then f(id, scratch) runs for every item, each thread over its share.
template <typename F>
static void run_by_work(std::vector<std::pair<int64_t, int64_t>> items, F f) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::sort(items.rbegin(), items.rend());
  std::vector<std::vector<int64_t>> share(threads);
  std::vector<int64_t> load(threads, 0);
  for (const auto& [work, id] : items) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(id);
    load[t] += work;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t id : share[t]) f(id, scratch);
  });
}

// Runs of rows that are consecutive tokens of one sequence (same blocks, context one longer each), at most
// RUN_ROWS long so a chunk still spreads over threads; a decode is a run of one.
constexpr int64_t RUN_ROWS = 8;

template <typename T>
static std::vector<std::pair<int64_t, int64_t>> row_runs(int64_t B, const PagedKV<T>& kv) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t b = 0; b < B;) {
    int64_t r = 1;
    if (kv.D % 16 == 0)
      while (b + r < B && r < RUN_ROWS && kv.lens[b + r] == kv.lens[b] + r &&
             std::equal(kv.tables + b * kv.W, kv.tables + b * kv.W + (kv.lens[b + r] + kv.BS - 1) / kv.BS,
                        kv.tables + (b + r) * kv.W))
        ++r;
    runs.emplace_back(b, r);
    b += r;
  }
  return runs;
}

template <typename T>
static void decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                                 float scale, float* O) {
  const int64_t pieces = context_pieces(B, kv);
  if (pieces > 1) return decode_attention_split(Q, B, H, ldq, kv, scale, pieces, O);
  const int64_t KVH = kv.KVH;
  const auto runs = row_runs(B, kv);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t singles = std::count_if(runs.begin(), runs.end(), [](const auto& r) { return r.second == 1; });
  // Single rows are items over their whole cache rows (seq_attention) where there are at least two per thread
  // or chunk runs to balance them against; with fewer (short contexts: longer ones were split into pieces
  // above), (row, KV head) items keep the threads evenly loaded. Per-head items read a third of each row,
  // strided: 30 layers' caches of 1500 tokens, 7 sequences 41.2 ms, 8 as whole rows 31.6.
  const bool whole = whole_rows(kv) && (singles >= 2 * threads || (int64_t)runs.size() > singles);
  if ((int64_t)runs.size() == B && !whole) {  // a few decodes: equal (row, KV head) items, heads fastest
    at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores;
      for (int64_t i = i0; i < i1; ++i) row_attention(Q, i / KVH, H, ldq, kv, i % KVH, scale, O, scores);
    });
    return;
  }
  // Items of different sizes (whole rows of contexts of different lengths, runs of chunk rows), shared out by work.
  std::vector<std::pair<int64_t, int64_t>> items;  // (work, item = run * (KVH + 1) + head, KVH: all heads)
  for (int64_t r = 0; r < (int64_t)runs.size(); ++r) {
    const auto [b0, rows] = runs[r];
    if (whole && rows == 1) {
      items.emplace_back(KVH * kv.lens[b0], r * (KVH + 1) + KVH);
      continue;
    }
    for (int64_t h = 0; h < KVH; ++h) items.emplace_back(rows * kv.lens[b0 + rows - 1], r * (KVH + 1) + h);
  }
  run_by_work(std::move(items), [&](int64_t item, std::vector<float>& scratch) {
    const auto [b0, rows] = runs[item / (KVH + 1)];
    const int64_t h = item % (KVH + 1);
    if (h == KVH) seq_attention(Q, b0, H, ldq, kv, scale, O, scratch);
    else if (rows == 1) row_attention(Q, b0, H, ldq, kv, h, scale, O, scratch);
    else run_attention(Q, b0, rows, H, ldq, kv, h, scale, O, scratch);
  });
}

// Flash-decoding for few sequences: (sequence, KV head) pairs alone leave threads idle or unevenly loaded
// (one sequence of a 3-KV-head model is 3 items for 2 threads: one waits a third of the time), so each
// context is cut into equal pieces attended in parallel, each keeping its max, exp-sum and unnormalised
// output, then merged. Pieces are at least MIN_PIECE tokens: below that the merge costs more than it saves.
constexpr int64_t MIN_PIECE = 32;

// Tokens [t0, t1) of sequence b for KV head h: per query head g, m[g] = max score, l[g] = sum of
// exp(score - m[g]), acc[g*D..] = sum of exp(score - m[g]) * V.
template <typename T>
static void partial_attention(const float* qb, int64_t group, const PagedKV<T>& kv, const int64_t* table, int64_t h,
                              int64_t t0, int64_t t1, float scale, float* scores, float* m, float* l, float* acc) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, n = t1 - t0;
  for (int64_t t = t0; t < t1; ++t) {
    const T* k = kv.K + ((table[t / BS] * BS + t % BS) * KVH + h) * D;
    score_group(qb, group, k, D, scale, scores, n, t - t0);
  }
  for (int64_t g = 0; g < group; ++g) l[g] = exp_inplace(scores + g * n, n, m + g);
  if (D == 64) {
    for (int64_t g = 0; g < group; ++g) attend_v64(scores + g * n, t0, t1, kv, table, h, acc + g * D);
    return;
  }
  std::fill(acc, acc + group * D, 0.f);
  for (int64_t t = t0; t < t1; ++t) {
    const T* v = kv.V + ((table[t / BS] * BS + t % BS) * KVH + h) * D;
    for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * n + t - t0], v, acc + g * D, D);
  }
}

template <typename T>
static void decode_attention_split(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                                   float scale, int64_t pieces, float* O) {
  const int64_t KVH = kv.KVH, D = kv.D, group = H / KVH, items = B * KVH * pieces;
  std::vector<float> M(items * group), L(M.size()), ACC(M.size() * D);
  if (whole_rows(kv)) {
    // Items (b, piece) over whole cache rows, every KV head in one pass (seq_partial); they fill M, L and
    // ACC in the (b, piece, h, g) order the merge reads. A lone sequence at 1300 tokens, 30 layers' caches
    // (more than the L3 holds), float32: per-head items 4.12 ms (14.6 GB/s), whole rows 3.00 ms (20.0 GB/s);
    // at 2300 tokens 7.85 -> 4.92 ms.
    // Shared out by work: sequences of different lengths in a contiguous split left one thread with the long ones.
    std::vector<std::pair<int64_t, int64_t>> work;
    for (int64_t i = 0; i < B * pieces; ++i) {
      const int64_t b = i / pieces, c = i % pieces, len = kv.lens[b];
      work.emplace_back((c + 1) * len / pieces - c * len / pieces, i);
    }
    run_by_work(std::move(work), [&](int64_t i, std::vector<float>& scores) {
      const int64_t b = i / pieces, c = i % pieces, len = kv.lens[b];
      seq_partial(Q + b * ldq, H, kv, kv.tables + b * kv.W, c * len / pieces, (c + 1) * len / pieces, scale, scores,
                  &M[i * H], &L[i * H], &ACC[i * H * D]);
    });
  } else {
    // i = (b, piece, h), heads fastest: a thread's items cover neighbouring parts of the same token rows;
    // head-major items read a third of each row and were twice as slow in the model.
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, kv.lens[b]);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(group * (longest / pieces + 1));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (KVH * pieces), c = (i / KVH) % pieces, h = i % KVH, len = kv.lens[b];
        partial_attention(Q + b * ldq + h * group * D, group, kv, kv.tables + b * kv.W, h, c * len / pieces,
                          (c + 1) * len / pieces, scale, scores.data(), &M[i * group], &L[i * group],
                          &ACC[i * group * D]);
      }
    });
  }
  for (int64_t j = 0; j < B * KVH * group; ++j) {  // j = (b, h, g): merge the pieces of one query head
    const int64_t b = j / (KVH * group), h = (j / group) % KVH, g = j % group;
    auto at = [&](int64_t c) { return ((b * pieces + c) * KVH + h) * group + g; };
    float mx = -INFINITY, sum = 0.f;
    for (int64_t c = 0; c < pieces; ++c) mx = std::max(mx, M[at(c)]);
    float* out = O + j * D;  // (b, h, g) is query head h * group + g of sequence b
    std::fill(out, out + D, 0.f);
    for (int64_t c = 0; c < pieces; ++c) {
      const int64_t k = at(c);
      const float w = std::exp(M[k] - mx);
      sum += w * L[k];
      axpy_f32(w, &ACC[k * D], out, D);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
}

// Pieces per context for decode_attention_split (1: no split): when there are fewer items than two per
// thread, the fewest pieces that give every thread the same number of items, each piece at least MIN_PIECE
// tokens of the shortest context. Items are rows where pieces read whole cache rows (whole_rows), else
// (row, KV head) pairs. (Splitting 5 or 7 whole-row items too, for 2 threads: 7% faster at equal
// lengths, 4-8% slower at different ones, which the sharing by work already balances.)
template <typename T>
static int64_t context_pieces(int64_t B, const PagedKV<T>& kv) {
  const int64_t threads = at::get_num_threads(), items = whole_rows(kv) ? B : B * kv.KVH;
  if (threads < 2 || items >= 2 * threads) return 1;
  int64_t shortest = kv.lens[0];
  for (int64_t b = 1; b < B; ++b) shortest = std::min(shortest, kv.lens[b]);
  for (int64_t p = 2; p * MIN_PIECE <= shortest; ++p)
    if ((items * p) % threads == 0) return p;
  return 1;
}

// Calls f with the cache tensor's element type as a null pointer of it: float32 or float16.
template <typename F>
static void with_cache_type(const torch::Tensor& cache, F f) {
  TORCH_CHECK(cache.dtype() == torch::kFloat32 || cache.dtype() == torch::kFloat16, "KV cache must be float32 or float16");
  if (cache.dtype() == torch::kFloat16) f((at::Half*)nullptr);
  else f((float*)nullptr);
}

// q [B, H, D]; k_cache, v_cache [blocks, block_size, KVH, D] float32 or float16; tables [B, W]; ctx_lens [B].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == v_cache.dtype() && k_cache.is_contiguous()
              && v_cache.is_contiguous() && tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64);
  q = q.contiguous();
  tables = tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  auto out = torch::empty_like(q);
  with_cache_type(k_cache, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const PagedKV<T> kv{(const T*)k_cache.data_ptr(), (const T*)v_cache.data_ptr(), tables.data_ptr<int64_t>(),
                        ctx_lens.data_ptr<int64_t>(), tables.size(1), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
    decode_attention_raw(q.data_ptr<float>(), q.size(0), q.size(1), q.size(1) * q.size(2), kv, (float)scale,
                         out.data_ptr<float>());
  });
  return out;
}

// n floats into a float32 or float16 cache row (float16 rounded to nearest even, as tensor.to(float16)).
static inline void store_row(const float* src, float* dst, int64_t n) { std::copy_n(src, n, dst); }
static inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = at::Half(src[i]);
}

// ---- KIVI cache: full blocks as packed codes (keys per channel, values per token), newest tokens in float ----

struct KiviKV {
  const uint8_t *KC, *VC;    // [blocks, BS, KVH, Wb] codes; planar: bits [i*b, (i+1)*b) of byte j = dim i*Wb + j
  const at::Half *KS, *KM;   // [blocks, KVH, D] key scale / min (per channel over the block)
  const at::Half *VS, *VM;   // [blocks, BS, KVH] value scale / min (per token)
  const float *RK, *RV;      // residual [slots, BS, KVH, D]
  const int64_t* tables;     // [B, W] full blocks
  const int64_t* lens;       // [B] context length, this token included (it is in the residual)
  const int64_t* slots;      // [B] residual slot holding the block still filling
  int64_t W, BS, KVH, D, bits;
};

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
// per head and shared by the group's query heads; the residual block is read as float.
static void kivi_decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const KiviKV& kv,
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
      scores.resize(group * len);
      for (int64_t j = 0; j < full; ++j) {
        kivi_block(kv, true, table[j], h, buf.data(), s.data(), m.data());
        for (int64_t t = 0; t < BS; ++t)
          for (int64_t g = 0; g < group; ++g)
            scores[g * len + j * BS + t] = dot_f32(qb + g * D, buf.data() + t * D, D) * scale;
      }
      for (int64_t t = 0; t < rest; ++t)
        for (int64_t g = 0; g < group; ++g)
          scores[g * len + full * BS + t] = dot_f32(qb + g * D, rk + t * row, D) * scale;
      for (int64_t g = 0; g < group; ++g) softmax_inplace(scores.data() + g * len, len);
      float* ob = O + (b * H + h * group) * D;
      std::fill(ob, ob + group * D, 0.f);
      for (int64_t j = 0; j < full; ++j) {
        kivi_block(kv, false, table[j], h, buf.data(), s.data(), m.data());
        for (int64_t t = 0; t < BS; ++t)
          for (int64_t g = 0; g < group; ++g)
            axpy_f32(scores[g * len + j * BS + t], buf.data() + t * D, ob + g * D, D);
      }
      for (int64_t t = 0; t < rest; ++t)
        for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * len + full * BS + t], rv + t * row, ob + g * D, D);
    }
  });
}

// A QuantKVCache's tensors, in ember.ops.kv_quant's order:
// [k_codes, k_scale, k_min, v_codes, v_scale, v_min, residual].
static KiviKV kivi_view(const std::vector<torch::Tensor>& c, const torch::Tensor& tables, const torch::Tensor& lens,
                        const torch::Tensor& slots, int64_t bits) {
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
                D, bits};
}

// q [B, H, D]; cache: a QuantKVCache's tensors; tables [B, W] full blocks; lens [B]; slots [B].
torch::Tensor kivi_decode_attention(torch::Tensor q, std::vector<torch::Tensor> cache, torch::Tensor tables,
                                    torch::Tensor lens, torch::Tensor slots, int64_t bits, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32);
  q = q.contiguous(); tables = tables.contiguous(); lens = lens.contiguous(); slots = slots.contiguous();
  auto out = torch::empty_like(q);
  const KiviKV kv = kivi_view(cache, tables, lens, slots, bits);
  kivi_decode_attention_raw(q.data_ptr<float>(), q.size(0), q.size(1), q.size(1) * q.size(2), kv, (float)scale,
                            out.data_ptr<float>());
  return out;
}

// ---- the whole decoder stack for a batch of single-token decodes, in one call ----

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
  // slots [B]; tables [B, W]; ctx_lens [B] (including this token). Returns the final-normed hidden states.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> caches,
                        torch::Tensor slots, torch::Tensor tables, torch::Tensor ctx_lens, double scale) {
    TORCH_CHECK(caches.size() == layers.size());
    tables = tables.contiguous(); slots = slots.contiguous(); ctx_lens = ctx_lens.contiguous();
    const int64_t kv_size = KVH * D;
    const int64_t* SL = slots.data_ptr<int64_t>();
    return run(x, cos, sin, [&](size_t i, float* QKV, int64_t B, int64_t ld, float* A) {
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
        const PagedKV<T> kv{KC, KC + plane, tables.data_ptr<int64_t>(), ctx_lens.data_ptr<int64_t>(),
                            tables.size(1), cache.size(2), KVH, D};
        decode_attention_raw(QKV, B, H, ld, kv, (float)scale, A);
      });
    });
  }

  // As forward over KIVI caches (each a QuantKVCache's 7 tensors): each new K/V goes to the residual at
  // flat index res_index[b] (slot * block_size + offset); tables [B, W] are the full blocks, res_slots [B]
  // the slots. Blocks that fill are quantized afterwards, in Python.
  torch::Tensor forward_kivi(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                             std::vector<std::vector<torch::Tensor>> caches, torch::Tensor res_index,
                             torch::Tensor tables, torch::Tensor ctx_lens, torch::Tensor res_slots, int64_t bits,
                             double scale) {
    TORCH_CHECK(caches.size() == layers.size());
    tables = tables.contiguous(); res_index = res_index.contiguous(); ctx_lens = ctx_lens.contiguous();
    res_slots = res_slots.contiguous();
    const int64_t kv_size = KVH * D;
    const int64_t* RI = res_index.data_ptr<int64_t>();
    return run(x, cos, sin, [&](size_t i, float* QKV, int64_t B, int64_t ld, float* A) {
      const KiviKV kv = kivi_view(caches[i], tables, ctx_lens, res_slots, bits);
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
  // outputs [B, H*D] to A.
  template <typename Attend>
  torch::Tensor run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, Attend attend) {
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
      rms_norm_raw(X, L.in_norm.data_ptr<float>(), B, hidden, eps, Hb);
      L.qkv.run(Hb, B, QKV);
      rope_raw(QKV, B, H, D, ld, cos.data_ptr<float>(), sin.data_ptr<float>());
      rope_raw(QKV + q_size, B, KVH, D, ld, cos.data_ptr<float>(), sin.data_ptr<float>());
      attend(i, QKV, B, ld, A);
      L.o.run(A, B, Tb);
      for (int64_t j = 0; j < B * hidden; ++j) X[j] += Tb[j];
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

// The kernels release the GIL so the server's event loop keeps running while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (float32)",
        release());
  m.def("kivi_decode_attention", &kivi_decode_attention, "decode attention over a KIVI-quantized cache",
        release());
  m.def("w8a8_linear", &w8a8_linear, "int8-weight linear with on-the-fly int8 activations (AVX2)", release());
  m.def("w4a8_linear", &w4a8_linear, "int4-weight linear with on-the-fly int8 activations (AVX2)", release());
  m.def("dequantize_into", &dequantize_into, "float32 weights from a packed int8 / int4 layer, into a given tensor",
        release());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (float32)", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up for a fused [gate | up] tensor (float32)", release());
  m.def("rope_", &rope_, "rotary embedding in place (float32, half-split layout)", release());
  py::class_<DecodeLinear>(m, "DecodeLinear")
      .def(py::init<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>());
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, double, torch::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward, "all layers for a batch of decode tokens", release())
      .def("forward_kivi", &DecodeModel::forward_kivi, "all layers for a batch of decode tokens, KIVI caches",
           release());
}
