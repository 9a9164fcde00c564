// Decode attention over the paged float32 / float16 KV cache. The measurements behind the design choices
// below are in BENCHMARKS.md ("Kernel design measurements").
#include "common.h"

#include <vector>

// Every cache line of the D elements at p: one head's key row for single decode rows (a head's rows are
// KVH * D apart: prefetching only each row's first line was slower; 8 rows ahead was the best distance
// tried; prefetching values the same way was slower), or a whole cache row for seq_attention.
template <typename T>
static inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t c = 0; c < D * (int64_t)sizeof(T); c += 64) _mm_prefetch((const char*)p + c, _MM_HINT_T0);
}

// Whether seq_partial can read this cache's rows whole (every KV head in one pass): head size a multiple of 64.
template <typename T>
static inline bool whole_rows(const PagedKV<T>& kv) { return kv.D % 64 == 0; }

// out[0..64) = sum over visible t in [begin, end) of p[t - begin] * V[t] for one KV head, in eight registers;
// the keys x hides are skipped (their blocks are not read).
template <typename T>
static void attend_v64(const float* p, int64_t begin, int64_t end, const PagedKV<T>& kv, const int64_t* table,
                       int64_t h, Hidden x, float* out) {
  const int64_t row = kv.KVH * kv.D;
  __m256 a[8];
  for (auto& r : a) r = _mm256_setzero_ps();
  for (int64_t b0 = begin; b0 < end;) {
    const int64_t b1 = std::min(end, (b0 / kv.BS + 1) * kv.BS);
    for (auto [t0, t1] : x.split(b0, b1)) {
      const T* v = kv.V + ((table[t0 / kv.BS] * kv.BS + t0 % kv.BS) * kv.KVH + h) * kv.D;
      for (int64_t t = t0; t < t1; ++t, v += row) {
        _mm_prefetch((const char*)(v + 4 * row), _MM_HINT_T0);
        const __m256 pt = _mm256_set1_ps(p[t - begin]);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(pt, load8_f32(v + 8 * j), a[j]);
      }
    }
    b0 = b1;
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

// One row (one query token, `group` query heads) against KV head h of its context; keys its window hides
// are skipped (neither scored nor read).
template <typename T>
static void row_attention(const float* Q, int64_t b, int64_t H, int64_t ldq, const PagedKV<T>& kv, int64_t h,
                          float scale, float* O, std::vector<float>& scores) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, len = kv.lens[b];
  const int64_t* table = kv.tables + b * kv.W;
  const Hidden x = hidden_keys(kv, b);
  scores.resize(group * len);
  const float* qb = Q + b * ldq + h * group * D;
  for (int64_t b0 = 0; b0 < len; b0 += BS) {
    for (auto [t0, t1] : x.split(b0, std::min(len, b0 + BS))) {
      const T* k = kv.K + ((table[t0 / BS] * BS + t0 % BS) * KVH + h) * D;
      for (int64_t t = t0; t < t1; ++t, k += row) {
        prefetch_row(k + 8 * row, D);
        score_group(qb, group, k, D, scale, scores.data(), len, t);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_visible(scores.data() + g * len, len, x);
  float* ob = O + (b * H + h * group) * D;
  if (D == 64) {  // the common head size: the output row lives in registers across the context
    for (int64_t g = 0; g < group; ++g) attend_v64(scores.data() + g * len, 0, len, kv, table, h, x, ob + g * D);
    return;
  }
  std::fill(ob, ob + group * D, 0.f);
  for (int64_t b0 = 0; b0 < len; b0 += BS) {
    for (auto [t0, t1] : x.split(b0, std::min(len, b0 + BS))) {
      const T* v = kv.V + ((table[t0 / BS] * BS + t0 % BS) * KVH + h) * D;
      for (int64_t t = t0; t < t1; ++t, v += row)
        for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * len + t], v, ob + g * D, D);
    }
  }
}

// Tokens [t0, t1) of one decode row (query heads qb, H x D) against every KV head at once: each token's
// cache row (KVH x D contiguous elements) is read once, in order, and the row `ahead` tokens on is
// prefetched through the block table (the next block is rarely the next in memory). Per query head j:
// m[j] = max score, l[j] = sum of exp(score - m[j]), acc[j * D ..] = sum of exp(score - m[j]) * V, the
// value rows accumulated in L1 (all H x D of them do not fit in registers). (Sequence, head) items would
// each read a third of every row, strided, which is markedly slower for batches of decodes, float32 and
// float16 alike. D must be a multiple of 64.
//
// Keys x hides are skipped (neither scored nor read): a piece they cover whole gets m = -inf, l = 0, acc = 0.
template <typename T>
static void seq_partial(const float* qb, int64_t H, const PagedKV<T>& kv, const int64_t* table, int64_t t0,
                        int64_t t1, Hidden x, float scale, std::vector<float>& S, float* m, float* l, float* acc) {
  constexpr int64_t ahead = 4;
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, n = t1 - t0;
  auto at = [&](const T* plane, int64_t t) { return plane + (table[t / BS] * BS + t % BS) * row; };
  const auto parts = x.split(t0, t1);
  S.resize(H * n);
  for (auto [s0, s1] : parts)
    for (int64_t t = s0; t < s1; ++t) {
      if (t + ahead < s1) prefetch_row(at(kv.K, t + ahead), row);
      const T* k = at(kv.K, t);
      for (int64_t h = 0; h < KVH; ++h)  // query heads h * group .. of KV head h
        score_group(qb + h * group * D, group, k + h * D, D, scale, &S[h * group * n], n, t - t0);
    }
  const Hidden local = x.within(t0, n);
  for (int64_t j = 0; j < H; ++j) l[j] = exp_visible(S.data() + j * n, n, local, &m[j]);
  std::fill(acc, acc + H * D, 0.f);
  for (auto [s0, s1] : parts)
    for (int64_t t = s0; t < s1; ++t) {
      if (t + ahead < s1) prefetch_row(at(kv.V, t + ahead), row);
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

// One decode row against its whole context (all but what its window hides), every KV head at once
// (seq_partial over all of it, normalised).
template <typename T>
static void seq_attention(const float* Q, int64_t b, int64_t H, int64_t ldq, const PagedKV<T>& kv, float scale,
                          float* O, std::vector<float>& S) {
  std::vector<float> ml(2 * H);
  float* ob = O + b * H * kv.D;
  seq_partial(Q + b * ldq, H, kv, kv.tables + b * kv.W, 0, kv.lens[b], hidden_keys(kv, b), scale, S, ml.data(),
              ml.data() + H, ob);
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
// costs markedly more per (query, key) pair. D must be a multiple of 16.
//
// WINDOW: row r hides its own keys [sink, starts[b0 + r]) (see Hidden). The keys every row of the run hides
// (`common`) are neither scored nor read; those only some rows hide (within `some`) are masked by a lane
// compare, as the causal mask is. Without a window both ranges are empty and that code compiles away.
template <bool WINDOW, typename T>
static void attend_run(const float* Q, int64_t b0, int64_t R, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                       int64_t h, float scale, float* O, std::vector<float>& S) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, group = H / KVH, row = KVH * D, nq = R * group;
  const int64_t L0 = kv.lens[b0], len = L0 + R - 1, NV = (nq + 7) / 8, ld = NV * 8;
  const int64_t* table = kv.tables + b0 * kv.W;
  Hidden common, some;
  if constexpr (WINDOW) {
    int64_t earliest = INT64_MAX, latest = 0;
    for (int64_t r = 0; r < R; ++r) {
      earliest = std::min(earliest, kv.starts[b0 + r]);
      latest = std::max(latest, kv.starts[b0 + r]);
    }
    if (earliest > kv.sink) common = {kv.sink, earliest};
    if (latest > kv.sink) some = {kv.sink, latest};
  }
  const auto visible = common.split(0, len);  // without a window: [0, 0) and [0, len)
  std::vector<int64_t> offs(len);  // element offset of token t's row for head h, in either plane
  for (int64_t t0 = 0; t0 < len; t0 += BS) {
    const int64_t base = (table[t0 / BS] * BS * KVH + h) * D;
    for (int64_t t = t0; t < std::min(len, t0 + BS); ++t) offs[t] = base + (t - t0) * row;
  }
  S.resize(ld * D + ld * len + QK_KEYS * D + 3 * ld);
  float *qt = S.data(), *sc = qt + ld * D, *kf = sc + ld * len, *inv = kf + QK_KEYS * D;
  float *hlo = inv + ld, *hhi = hlo + ld;  // WINDOW: each query lane's hidden keys [hlo, hhi)
  std::fill(qt, qt + ld * D, 0.f);  // padding lanes score 0 and are never written out
  for (int64_t j = 0; j < nq; ++j) {
    const float* q = Q + (b0 + j / group) * ldq + (h * group + j % group) * D;
    for (int64_t c = 0; c < D; ++c) qt[c * ld + j] = q[c] * scale;
  }
  for (auto [s0, s1] : visible)
    for (int64_t t = s0; t < s1; t += QK_KEYS) {
      const int nk = (int)std::min<int64_t>(QK_KEYS, s1 - t);
      const float* k[QK_KEYS];
      for (int i = 0; i < QK_KEYS; ++i) {
        const T* src = kv.K + offs[t + std::min(i, nk - 1)];
        if (t + QK_KEYS + i < s1) prefetch_row(kv.K + offs[t + QK_KEYS + i], D);
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
  if constexpr (WINDOW) {
    for (int64_t j = 0; j < ld; ++j) {  // padding lanes hide nothing
      const Hidden x = j < nq ? hidden_keys(kv, b0 + j / group) : Hidden{};
      hlo[j] = (float)x.lo;
      hhi[j] = (float)x.hi;
    }
  }
  // Softmax down each query's column; query j (row j / group) sees keys t < L0 + j / group (and, WINDOW,
  // not those its row hides).
  for (int64_t v = 0; v < NV; ++v) {
    alignas(32) float rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = (float)std::min(R, (8 * v + i) / group);  // padding: sees all
    const __m256 r = _mm256_load_ps(rows);
    auto seen = [&](int64_t t) { return _mm256_cmp_ps(r, _mm256_set1_ps((float)(t - L0)), _CMP_GT_OQ); };
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    if constexpr (WINDOW) {
      lo = _mm256_loadu_ps(hlo + 8 * v);
      hi = _mm256_loadu_ps(hhi + 8 * v);
    }
    auto hidden = [&](int64_t t) {  // lanes with lo <= t < hi
      const __m256 tv = _mm256_set1_ps((float)t);
      return _mm256_and_ps(_mm256_cmp_ps(lo, tv, _CMP_LE_OQ), _mm256_cmp_ps(hi, tv, _CMP_GT_OQ));
    };
    __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    for (auto [s0, s1] : visible)
      for (int64_t t = s0; t < s1; ++t) {
        __m256 x = _mm256_loadu_ps(sc + t * ld + 8 * v);
        if (t >= L0) x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, seen(t));
        if constexpr (WINDOW)
          if (t >= some.lo && t < some.hi) x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), hidden(t));
        mx = _mm256_max_ps(mx, x);
      }
    for (auto [s0, s1] : visible)
      for (int64_t t = s0; t < s1; ++t) {
        float* x = sc + t * ld + 8 * v;
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x), mx));
        if (t >= L0) e = _mm256_and_ps(e, seen(t));
        if constexpr (WINDOW)
          if (t >= some.lo && t < some.hi) e = _mm256_andnot_ps(hidden(t), e);
        _mm256_storeu_ps(x, e);
        sum = _mm256_add_ps(sum, e);
      }
    _mm256_storeu_ps(inv + 8 * v, _mm256_div_ps(_mm256_set1_ps(1.f), sum));
  }
  // Values in blocks of PV_TOKENS tokens (16 KB of a 64-wide head), which stay in L1 for all the query tiles
  // and column slices; walking the whole context per tile and slice read them from L2 each time. Each tile's
  // first block (which every tile has: even the shortest row sees its own key past `common`) starts its
  // sums; the others add to them.
  constexpr int64_t PV_TOKENS = 64;
  const int64_t first = visible[0].second > 0 ? 0 : visible[1].first;
  float* o[6];
  for (auto [s0, s1] : visible)
    for (int64_t t0 = s0; t0 < s1; t0 += PV_TOKENS) {
      for (int64_t j0 = 0; j0 < nq; j0 += 6) {
        const int n = (int)std::min<int64_t>(6, nq - j0);
        const int64_t t1 = std::min({t0 + PV_TOKENS, s1, L0 + (j0 + n - 1) / group});  // the tile's longest context
        if (t1 <= t0) continue;
        for (int i = 0; i < n; ++i) o[i] = O + ((b0 + (j0 + i) / group) * H + h * group + (j0 + i) % group) * D;
        const float* p = sc + j0;
        const bool start = t0 == first;
        for (int64_t c = 0; c < D; c += 16) switch (n) {
          case 6: pv_tile<6>(p, ld, kv.V, offs.data(), t0, t1, c, start, o); break;
          case 5: pv_tile<5>(p, ld, kv.V, offs.data(), t0, t1, c, start, o); break;
          case 4: pv_tile<4>(p, ld, kv.V, offs.data(), t0, t1, c, start, o); break;
          case 3: pv_tile<3>(p, ld, kv.V, offs.data(), t0, t1, c, start, o); break;
          case 2: pv_tile<2>(p, ld, kv.V, offs.data(), t0, t1, c, start, o); break;
          default: pv_tile<1>(p, ld, kv.V, offs.data(), t0, t1, c, start, o);
        }
      }
    }
  for (int64_t j = 0; j < nq; ++j) {
    float* out = O + ((b0 + j / group) * H + h * group + j % group) * D;
    const __m256 w = _mm256_set1_ps(inv[j]);
    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(out + c), w));
  }
}

// attend_run, with the window code where some row of the run has a window that hides keys.
template <typename T>
static void run_attention(const float* Q, int64_t b0, int64_t R, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                          int64_t h, float scale, float* O, std::vector<float>& S) {
  if (kv.starts)
    for (int64_t r = 0; r < R; ++r)
      if (!hidden_keys(kv, b0 + r).empty()) return attend_run<true>(Q, b0, R, H, ldq, kv, h, scale, O, S);
  attend_run<false>(Q, b0, R, H, ldq, kv, h, scale, O, S);
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
void decode_attention_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
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
  // strided: at long contexts, more rows over whole cache rows take less time than fewer rows per head.
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
    const int64_t b1 = b0 + rows - 1, keys = hidden_keys(kv, b1).visible(kv.lens[b1]);  // the run's longest
    if (whole && rows == 1) {
      items.emplace_back(KVH * keys, r * (KVH + 1) + KVH);
      continue;
    }
    for (int64_t h = 0; h < KVH; ++h) items.emplace_back(rows * keys, r * (KVH + 1) + h);
  }
  run_by_work(std::move(items), [&](int64_t item, std::vector<float>& scratch) {
    const auto [b0, rows] = runs[item / (KVH + 1)];
    const int64_t h = item % (KVH + 1);
    if (h == KVH) seq_attention(Q, b0, H, ldq, kv, scale, O, scratch);
    else if (rows == 1) row_attention(Q, b0, H, ldq, kv, h, scale, O, scratch);
    else run_attention(Q, b0, rows, H, ldq, kv, h, scale, O, scratch);
  });
}

// Each row as a one-row decode_attention_raw call computes it, bit for bit, in one parallel region: a
// one-row call over a context long enough splits it into pieces, and rows that would all get the same
// split are that many (row, piece) items of one decode_attention_split (every item and the merge depend on
// their own row only). Others go row by row. One parallel region instead of one per row: at 8 rows and 30
// layers the per-call thread start-ups were a sizeable share of a speculative verification step.
template <typename T>
void decode_attention_alone_raw(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                                float scale, float* O) {
  auto row = [&](int64_t b) {
    return PagedKV<T>{kv.K, kv.V, kv.tables + b * kv.W, kv.lens + b, kv.W, kv.BS, kv.KVH, kv.D,
                      kv.starts ? kv.starts + b : nullptr, kv.sink};
  };
  const int64_t pieces = B ? context_pieces(1, row(0)) : 1;
  bool same = pieces > 1;
  for (int64_t b = 1; b < B && same; ++b) same = context_pieces(1, row(b)) == pieces;
  if (same) return decode_attention_split(Q, B, H, ldq, kv, scale, pieces, O);
  for (int64_t b = 0; b < B; ++b) decode_attention_raw(Q + b * ldq, 1, H, ldq, row(b), scale, O + b * H * kv.D);
}

// Flash-decoding for few sequences: (sequence, KV head) pairs alone leave threads idle or unevenly loaded
// (one sequence of a 3-KV-head model is 3 items for 2 threads: one waits a third of the time), so each
// context is cut into equal pieces attended in parallel, each keeping its max, exp-sum and unnormalised
// output, then merged. Pieces are at least MIN_PIECE tokens: below that the merge costs more than it saves.
constexpr int64_t MIN_PIECE = 32;

// Tokens [t0, t1) of sequence b for KV head h: per query head g, m[g] = max score, l[g] = sum of
// exp(score - m[g]), acc[g*D..] = sum of exp(score - m[g]) * V. Keys x hides are skipped (neither scored nor
// read); a piece they cover whole gets m = -inf, l = 0, acc = 0.
template <typename T>
static void partial_attention(const float* qb, int64_t group, const PagedKV<T>& kv, const int64_t* table, int64_t h,
                              int64_t t0, int64_t t1, Hidden x, float scale, float* scores, float* m, float* l,
                              float* acc) {
  const int64_t KVH = kv.KVH, D = kv.D, BS = kv.BS, n = t1 - t0;
  const auto parts = x.split(t0, t1);
  for (auto [s0, s1] : parts)
    for (int64_t t = s0; t < s1; ++t) {
      const T* k = kv.K + ((table[t / BS] * BS + t % BS) * KVH + h) * D;
      score_group(qb, group, k, D, scale, scores, n, t - t0);
    }
  const Hidden local = x.within(t0, n);
  for (int64_t g = 0; g < group; ++g) l[g] = exp_visible(scores + g * n, n, local, m + g);
  if (D == 64) {
    for (int64_t g = 0; g < group; ++g) attend_v64(scores + g * n, t0, t1, kv, table, h, x, acc + g * D);
    return;
  }
  std::fill(acc, acc + group * D, 0.f);
  for (auto [s0, s1] : parts)
    for (int64_t t = s0; t < s1; ++t) {
      const T* v = kv.V + ((table[t / BS] * BS + t % BS) * KVH + h) * D;
      for (int64_t g = 0; g < group; ++g) axpy_f32(scores[g * n + t - t0], v, acc + g * D, D);
    }
}

// Piece c of `pieces` of row b's context: an equal share of the keys its window leaves visible, as the
// range [t0, t1) of the context they span (the hidden keys inside it are skipped).
template <typename T>
static inline std::pair<int64_t, int64_t> piece(const PagedKV<T>& kv, int64_t b, int64_t c, int64_t pieces) {
  const Hidden x = hidden_keys(kv, b);
  const int64_t keys = x.visible(kv.lens[b]);
  auto at = [&](int64_t i) { return i < x.lo ? i : i + (x.hi - x.lo); };  // the i-th visible key
  return {at(c * keys / pieces), at((c + 1) * keys / pieces)};
}

template <typename T>
static void decode_attention_split(const float* Q, int64_t B, int64_t H, int64_t ldq, const PagedKV<T>& kv,
                                   float scale, int64_t pieces, float* O) {
  const int64_t KVH = kv.KVH, D = kv.D, group = H / KVH, items = B * KVH * pieces;
  std::vector<float> M(items * group), L(M.size()), ACC(M.size() * D);
  if (whole_rows(kv)) {
    // Items (b, piece) over whole cache rows, every KV head in one pass (seq_partial); they fill M, L and
    // ACC in the (b, piece, h, g) order the merge reads. Once the caches outgrow the L3, one sequential
    // stream of whole rows reads memory markedly faster than per-head items striding over a third of each.
    // Shared out by work: sequences of different lengths in a contiguous split left one thread with the long ones.
    std::vector<std::pair<int64_t, int64_t>> work;
    for (int64_t i = 0; i < B * pieces; ++i) {
      const int64_t b = i / pieces, c = i % pieces, keys = hidden_keys(kv, b).visible(kv.lens[b]);
      work.emplace_back((c + 1) * keys / pieces - c * keys / pieces, i);
    }
    run_by_work(std::move(work), [&](int64_t i, std::vector<float>& scores) {
      const int64_t b = i / pieces;
      const auto [t0, t1] = piece(kv, b, i % pieces, pieces);
      seq_partial(Q + b * ldq, H, kv, kv.tables + b * kv.W, t0, t1, hidden_keys(kv, b), scale, scores, &M[i * H],
                  &L[i * H], &ACC[i * H * D]);
    });
  } else {
    // i = (b, piece, h), heads fastest: a thread's items cover neighbouring parts of the same token rows;
    // head-major items read a third of each row and were twice as slow in the model.
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, kv.lens[b]);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(group * (longest / pieces + 1));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (KVH * pieces), c = (i / KVH) % pieces, h = i % KVH;
        const auto [t0, t1] = piece(kv, b, c, pieces);
        scores.resize(std::max<int64_t>(scores.size(), group * (t1 - t0)));  // a piece may span hidden keys
        partial_attention(Q + b * ldq + h * group * D, group, kv, kv.tables + b * kv.W, h, t0, t1,
                          hidden_keys(kv, b), scale, scores.data(), &M[i * group], &L[i * group],
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
      if (M[k] == -INFINITY) continue;  // a piece whose keys its window hides: nothing to add (and no NaN)
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
// visible tokens of the shortest context. Items are rows where pieces read whole cache rows (whole_rows), else
// (row, KV head) pairs. (Splitting an odd number of whole-row items too would help a little at equal
// lengths and cost a little at different ones, which the sharing by work already balances.)
template <typename T>
static int64_t context_pieces(int64_t B, const PagedKV<T>& kv) {
  const int64_t threads = at::get_num_threads(), items = whole_rows(kv) ? B : B * kv.KVH;
  if (threads < 2 || items >= 2 * threads) return 1;
  int64_t shortest = INT64_MAX;
  for (int64_t b = 0; b < B; ++b) shortest = std::min(shortest, hidden_keys(kv, b).visible(kv.lens[b]));
  for (int64_t p = 2; p * MIN_PIECE <= shortest; ++p)
    if ((items * p) % threads == 0) return p;
  return 1;
}

// q [B, H, D]; k_cache, v_cache [blocks, block_size, KVH, D] float32 or float16; tables [B, W]; ctx_lens [B];
// starts [B] or None: row b sees keys t < sink and starts[b] <= t < ctx_lens[b] (None: all of its context).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor ctx_lens, double scale,
                                     c10::optional<torch::Tensor> starts, int64_t sink) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == v_cache.dtype() && k_cache.is_contiguous()
              && v_cache.is_contiguous() && tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64);
  q = q.contiguous();
  tables = tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  const torch::Tensor window = window_starts(starts, ctx_lens, sink);
  auto out = torch::empty_like(q);
  with_cache_type(k_cache, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const PagedKV<T> kv{(const T*)k_cache.data_ptr(), (const T*)v_cache.data_ptr(), tables.data_ptr<int64_t>(),
                        ctx_lens.data_ptr<int64_t>(), tables.size(1), k_cache.size(1), k_cache.size(2), k_cache.size(3),
                        starts_ptr(window), sink};
    decode_attention_raw(q.data_ptr<float>(), q.size(0), q.size(1), q.size(1) * q.size(2), kv, (float)scale,
                         out.data_ptr<float>());
  });
  return out;
}

template void decode_attention_raw<float>(const float*, int64_t, int64_t, int64_t, const PagedKV<float>&, float, float*);
template void decode_attention_alone_raw<float>(const float*, int64_t, int64_t, int64_t, const PagedKV<float>&, float,
                                               float*);
template void decode_attention_alone_raw<at::Half>(const float*, int64_t, int64_t, int64_t, const PagedKV<at::Half>&,
                                                  float, float*);
template void decode_attention_raw<at::Half>(const float*, int64_t, int64_t, int64_t, const PagedKV<at::Half>&, float,
                                              float*);
