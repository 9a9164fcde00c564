// CPU kernels for int8-weight linear layers (ember/ops/quant.py loads this with torch's cpp_extension).
// Weights: int8 [N, K] with one float scale per group of 32 along K (symmetric).
// Activations are quantized the same way on the fly, and each group's dot product is computed with
// AVX2 integer multiply-adds (as llama.cpp's q8_0 x q8_0), then scaled and accumulated in float.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

static constexpr int G = 32;

// Quantize rows of x [M, K] to int8 per group of 32: q = round(x / s), s = max|x| / 127.
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* s) {
  const int64_t groups = K / G;
  at::parallel_for(0, M * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + (i / groups) * K + (i % groups) * G;
      float amax = 0.f;
      for (int j = 0; j < G; ++j) amax = std::max(amax, std::fabs(src[j]));
      const float scale = amax / 127.f;
      const float inv = scale > 0.f ? 1.f / scale : 0.f;
      s[i] = scale;
      int8_t* dst = q + (i / groups) * K + (i % groups) * G;
      for (int j = 0; j < G; ++j) dst[j] = (int8_t)std::nearbyint(src[j] * inv);
    }
  });
}

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 32 int8 x 32 int8 -> 8 int32 partial sums as floats.
static inline __m256 dot32(__m256i a, __m256i b) {
  const __m256i ax = _mm256_sign_epi8(a, a);      // |a|, unsigned for maddubs
  const __m256i sb = _mm256_sign_epi8(b, a);      // b with a's sign
  const __m256i p16 = _mm256_maddubs_epi16(ax, sb);
  const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
  return _mm256_cvtepi32_ps(p32);
}

// y [M, N] = x [M, K] . w^T for int8 w [N, K] with group scales ws [N, K/32].
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && wq.dtype() == torch::kInt8 && ws.dtype() == torch::kFloat32);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0), groups = K / G;
  TORCH_CHECK(K % G == 0 && wq.size(1) == K && ws.size(0) == N && ws.size(1) == groups);
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xs = torch::empty({M, groups}, torch::kFloat32);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat32);
  const int8_t* W = wq.data_ptr<int8_t>();
  const float* WS = ws.data_ptr<float>();
  const int8_t* X = xq.data_ptr<int8_t>();
  const float* XS = xs.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wrow = W + n * K;
      const float* wsrow = WS + n * groups;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xrow = X + m * K;
        const float* xsrow = XS + m * groups;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const __m256i a = _mm256_loadu_si256((const __m256i*)(xrow + g * G));
          const __m256i b = _mm256_loadu_si256((const __m256i*)(wrow + g * G));
          acc = _mm256_fmadd_ps(_mm256_set1_ps(xsrow[g] * wsrow[g]), dot32(a, b), acc);
        }
        Y[m * N + n] = hsum(acc);
      }
    }
  });
  return y;
}

// ---- small fused float32 ops for the decode path (each replaces several PyTorch ops) ----

// out = x * rsqrt(mean(x^2) + eps) * w, per row of x [T, D].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32);
  x = x.contiguous();
  const int64_t D = x.size(-1), T = x.numel() / D;
  auto out = torch::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = X + t * D;
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * xr[i];
      const float r = 1.f / std::sqrt((float)(ss / D) + (float)eps);
      float* o = O + t * D;
      for (int64_t i = 0; i < D; ++i) o[i] = W[i] * (xr[i] * r);
    }
  });
  return out;
}

// silu(g) * u for gu = [gate | up] of shape [T, 2I]; returns [T, I].
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dtype() == torch::kFloat32);
  gu = gu.contiguous();
  const int64_t I = gu.size(-1) / 2, T = gu.numel() / (2 * I);
  auto out = torch::empty({T, I}, gu.options());
  const float* G = gu.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *g = G + t * 2 * I, *u = g + I;
      float* o = O + t * I;
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// In-place rotary embedding (half-split layout) on x [T, H, D] with cos/sin [T, D].
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous());
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  float* X = x.data_ptr<float>();
  const float *C = cos.data_ptr<float>(), *S = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float *c = C + t * D, *s = S + t * D;
    for (int64_t h = 0; h < H; ++h) {
      float* v = X + (t * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// One query token per sequence attending to its context straight from the paged cache (no gather).
// q [B, H, D]; k_cache, v_cache [blocks, block_size, KVH, D]; tables [B, W]; ctx_lens [B].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 && k_cache.is_contiguous()
              && v_cache.is_contiguous() && tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64);
  q = q.contiguous();
  tables = tables.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), W = tables.size(1), G = H / KVH;
  auto out = torch::empty_like(q);
  const float *Q = q.data_ptr<float>(), *K = k_cache.data_ptr<float>(), *V = v_cache.data_ptr<float>();
  const int64_t *T = tables.data_ptr<int64_t>(), *L = ctx_lens.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, kvh = i % KVH, len = L[b];
      scores.assign(G * len, 0.f);
      const float* qb = Q + (b * H + kvh * G) * D;
      for (int64_t t = 0; t < len; ++t) {
        const float* k = K + ((T[b * W + t / BS] * BS + t % BS) * KVH + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
          scores[g * len + t] = dot * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * len;
        float mx = s[0];
        for (int64_t t = 1; t < len; ++t) mx = std::max(mx, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      float* ob = O + (b * H + kvh * G) * D;
      for (int64_t j = 0; j < G * D; ++j) ob[j] = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        const float* v = V + ((T[b * W + t / BS] * BS + t % BS) * KVH + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* og = ob + g * D;
          for (int64_t d = 0; d < D; ++d) og[d] += p * v[d];
        }
      }
    }
  });
  return out;
}

// The kernels release the GIL so the server's event loop keeps running while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (float32)",
        release());
  m.def("w8a8_linear", &w8a8_linear, "int8-weight linear with on-the-fly int8 activations (AVX2)", release());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (float32)", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up for a fused [gate | up] tensor (float32)", release());
  m.def("rope_", &rope_, "rotary embedding in place (float32, half-split layout)", release());
}
