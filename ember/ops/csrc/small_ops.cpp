// Small fused float32 ops for the decode path (each replaces several PyTorch ops).
#include "common.h"

// out = x * rsqrt(mean(x^2) + eps) * w, per row of x [T, D].
void rms_norm_raw(const float* X, const float* W, int64_t T, int64_t D, float eps, float* O) {
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

void silu_mul_raw(const float* GU, int64_t T, int64_t I, float* O) {
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
void rope_raw(float* X, int64_t T, int64_t H, int64_t D, int64_t ld, const float* C, const float* S) {
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
