// Quantized linear layers (see common.h): weights int8 [N, K] (symmetric) or int4 packed [N, K/2] (asymmetric,
// w = q * scale + min), with one scale (and min) per group of `group` inputs along K. Activations are
// quantized on the fly to int8 per block of 32, and each block's dot product runs on AVX2 integer
// multiply-adds (as llama.cpp's q8_0 / q4_1 x q8 dots), then is scaled and accumulated in float. The
// measurements behind the design choices below are in BENCHMARKS.md ("Kernel design measurements").
#include "common.h"

// Activations [M, K] quantized per block of 32: q = round(x / s), s = max|x| / 127; sum = s * sum(q).
struct QuantAct {
  torch::Tensor q, s, sum;
};

// One block of 32: q = round-to-nearest-even(x * (1 / s)), as the scalar std::nearbyint under the default
// rounding mode; returns sum(q). Eight lanes at a time: at one activation row this runs serially before
// every projection (a block per 32 inputs), so a scalar loop shows in the step time.
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

// Load 32 int4 codes of one block (16 bytes) as 32 bytes 0..15 in block order.
static inline __m256i load_u4(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

template <int BITS>
static inline __m256i load_block(const uint8_t* wrow, int64_t b) {
  return BITS == 4 ? load_u4(wrow + b * G / 2) : _mm256_loadu_si256((const __m256i*)(wrow + b * G));
}

// One block's integer dot as 8 float lanes, each lane the exact integer sum of its 4 products, so every
// path below gives the same bits. With AVX-512 VNNI (compiled in where the CPU has it, see kernels.py) one
// vpdpbusd does the multiply-adds: int4 codes are unsigned already; int8 weights are made unsigned (w + 128,
// `dot_weights`) and the excess 128 * sum(x) per lane taken off by starting the sum from its negation
// (`aux`, once per activation block). Without VNNI, maddubs + madd: maddubs needs an unsigned operand, so
// |x| (`aux`) times w with x's sign (no saturation: 2 * 127 * 127 and 2 * 15 * 127 fit in int16).
template <int BITS>
static inline __m256i dot_weights(const uint8_t* wrow, int64_t b) {
  const __m256i w = load_block<BITS>(wrow, b);
#ifdef EMBER_VNNI
  if (BITS == 8) return _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
#endif
  return w;
}

// What block_dot needs of an activation block beside its codes (hoisted: it serves every weight row).
template <int BITS>
static inline __m256i dot_aux(__m256i xv) {
  if (BITS == 4) return _mm256_setzero_si256();
#ifdef EMBER_VNNI
  const __m256i excess = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), xv);
  return _mm256_sub_epi32(_mm256_setzero_si256(), excess);
#else
  return _mm256_sign_epi8(xv, xv);
#endif
}

template <int BITS>
static inline __m256 block_dot(__m256i xv, __m256i aux, __m256i wv) {
#ifdef EMBER_VNNI
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(aux, wv, xv));
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if (BITS == 4) return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(aux, _mm256_sign_epi8(wv, xv)), ones));
#endif
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
      for (int r = 0; r < R; ++r) wv[r] = dot_weights<BITS>(w[r], b);
      for (int c = 0; c < C; ++c) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + c * K + b * G));
        const __m256i ax = dot_aux<BITS>(xv);
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
// before the dot loop instead of a scalar half-to-float per block (markedly faster at one row; calling
// mins_share afterwards, through wxa8_rows' finish, was slower in decode). Same operations per pair in the
// same order as dot_tile and mins_share, so the results are bit-identical to the tiled path.
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
      const __m256i ax = dot_aux<BITS>(xv);
      acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs0 + j), block_dot<BITS>(xv, ax, dot_weights<BITS>(w0, b)), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs1 + j), block_dot<BITS>(xv, ax, dot_weights<BITS>(w1, b)), acc1);
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
  // streams the weights from memory markedly slower.
  const int64_t ahead = std::max<int64_t>(2 * row_bytes, 1024);
  at::parallel_for(0, (N + 1) / 2, M < 4 ? 8 : 2, [&](int64_t p0, int64_t p1) {
    float out[8];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 2 * p, rows = std::min<int64_t>(2, N - n);
      const uint8_t* w[2] = {row(n), row(n + rows - 1)};
      const P* s[2] = {ws + n * groups, ws + (n + rows - 1) * groups};
      if (M >= 2 && p + 1 < (N + 1) / 2)  // the next pair's weight rows, on their way while these tiles run
        for (int64_t off = 0; off < 2 * row_bytes; off += 64) _mm_prefetch((const char*)row(n + 2) + off, _MM_HINT_T0);
      for (int64_t m = 0; m < tiled_m; m += 4) {
        dot_tile<BITS, PER1, 2, 4>(w, s, X + m * K, XS + m * blocks, K, groups, per, out);
        for (int64_t r = 0; r < rows; ++r)
          for (int i = 0; i < 4; ++i) finish(n + r, m + i, out[4 * r + i]);
      }
      // The last 1-3 rows after tiles (or 2-3 rows alone) run as one narrower tile: row by row, each costs
      // about as much as a whole tile of four. A lone row with one block per group stays on pair_dot_per1
      // (faster there), and a single row on the streaming paths below.
      const int64_t tail = M - tiled_m;
      if (tail >= 2 || (tiled_m && tail == 1 && !PER1)) {
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
        // one row at a time: one sequential stream from memory (two interleaved streams were slower, even
        // with both rows' accumulators in registers and prefetching)
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
void wxa8_any(const float* x, int64_t M, int64_t K, const void* wq, const torch::Tensor& ws,
                     const torch::Tensor* wm, const float* bias, int64_t N, int bits, float* y, int64_t ldy) {
  const int64_t group = K / ws.size(1);
  if (ws.dtype() == torch::kFloat16)
    wxa8_raw(x, M, K, wq, ws.data_ptr<at::Half>(), wm ? wm->data_ptr<at::Half>() : nullptr, bias, N, group, bits, y, ldy);
  else
    wxa8_raw(x, M, K, wq, ws.data_ptr<float>(), wm ? wm->data_ptr<float>() : nullptr, bias, N, group, bits, y, ldy);
}

// Checks a packed weight (int8 [N, K], or int4 [N, K/2] with mins) and its group scales [N, K/group];
// returns K.
int64_t check_packed(const torch::Tensor& wq, const torch::Tensor& ws, const torch::Tensor* wm, int bits) {
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
// then an add: the same float32 results), into `out`, which the caller reuses: a fresh multi-megabyte
// tensor per call costs more in page faults than the conversion itself.
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
