// CPU kernels for a decode step, called from XLA through its FFI (see cpu_kernels/__init__.py).
//
// XLA:CPU runs the few-row products of a decode step far below the memory bandwidth (a [5, 576] x
// [576, 1536] product, a query group against 4K keys: results/bench_decode*.md). These kernels
// stream each weight and each key once, with register-blocked FMAs on 16-lane vectors (GCC vector
// extensions: AVX-512 where the build machine has it, two AVX2 halves elsewhere), on the XLA
// intra-op thread pool.
//
// panel_matmul: y[M, N] = x[M, K] @ W[K, N] with W packed in panels of 64 columns, [N / 64, K, 64]:
//   each panel is one contiguous stream (a row-major W would be read at a stride of N floats).
// decode_attention: a few queries per row (an AR step, a verify chunk, a draft tree) against a
//   position-ordered cache [B, Hkv, S, D]; key j is visible to query t iff j < filled, or j is chunk
//   token j - filled and chunk_mask[t, j - filled]. Each (row, KV head) is split into key ranges
//   whose partial softmaxes are merged at the end (split-K), so two threads share one head.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;
constexpr int kPanel = 64;                 // columns of a packed weight panel
constexpr int kPanelVectors = kPanel / kLanes;
constexpr int kRowBlock = 6;               // rows of x per register tile: 6 x 4 accumulators
constexpr int64_t kSplitKeys = 512;        // keys per attention work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline f32x16 load(const float* p) { f32x16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x16 splat(float x) { return f32x16{} + x; }

template <typename A, typename B>
bool same_dims(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Sixteen accumulators -> one vector whose lane i is the sum of acc[i]'s lanes (a shuffle tree:
// each level folds every vector's halves and packs two vectors into one; the lanes come out in
// bit-reversed order, which the last shuffle undoes).
inline f32x16 lane_sums(const f32x16* a) {
  f32x16 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                   15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                   27, 14, 15, 30, 31);
  f32x16 f = __builtin_shufflevector(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                     14, 30) +
             __builtin_shufflevector(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                     15, 31);
  return __builtin_shufflevector(f, f, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// exp(x) for x <= 0 (scores minus their row max), exact to a few ulp; -inf gives 0.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 low = splat(-87.0f);
  f32x16 clamped = x < low ? low : x;
  f32x16 t = clamped * 1.44269504088896341f;
  f32x16 n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  f32x16 r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  f32x16 p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 result = p * (f32x16)bits;
  return x < low ? splat(0.0f) : result;
}

// Runs fn(i) for every i in [0, n) on this thread and the pool's. A helper that starts late finds
// no work left and touches nothing but the shared counters, so the caller waits only for items,
// never for a helper to be scheduled (no deadlock when the pool is busy).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  const F* body = &fn;
  auto work = [counters, n, body]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      (*body)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// y[m, 0:64] (row stride ldy) = sum_k x[m, k] (row stride ldx) * w[k, 0:64] (row stride ldw),
// for R <= kRowBlock rows: R x 4 vector accumulators in registers, one pass over w.
template <int R>
void row_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t depth, float* y,
              int64_t ldy) {
  f32x16 acc[R][kPanelVectors] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = w + k * ldw;
    f32x16 wv[kPanelVectors];
    for (int v = 0; v < kPanelVectors; ++v) wv[v] = load(row + kLanes * v);
    for (int m = 0; m < R; ++m) {
      f32x16 xs = splat(x[m * ldx + k]);
      for (int v = 0; v < kPanelVectors; ++v) acc[m][v] += xs * wv[v];
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < kPanelVectors; ++v) store(y + m * ldy + kLanes * v, acc[m][v]);
}

// Any number of rows, in register tiles of kRowBlock (w stays in cache between tiles).
void rows_by_panel(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t ldw,
                   int64_t depth, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
    const float* xt = x + m0 * ldx;
    float* yt = y + m0 * ldy;
    switch (std::min<int64_t>(kRowBlock, rows - m0)) {
      case 1: row_tile<1>(xt, ldx, w, ldw, depth, yt, ldy); break;
      case 2: row_tile<2>(xt, ldx, w, ldw, depth, yt, ldy); break;
      case 3: row_tile<3>(xt, ldx, w, ldw, depth, yt, ldy); break;
      case 4: row_tile<4>(xt, ldx, w, ldw, depth, yt, ldy); break;
      case 5: row_tile<5>(xt, ldx, w, ldw, depth, yt, ldy); break;
      default: row_tile<6>(xt, ldx, w, ldw, depth, yt, ldy); break;
    }
  }
}

constexpr int64_t kRowsPerItem = 96;  // rows of a long x (a prefill chunk) per work item

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kPanel || pd[1] != xd[1])
    return ffi::Error::InvalidArgument("panel_matmul: x [M, K] and panels [P, K, 64] expected");
  const int64_t rows = xd[0], depth = xd[1], num_panels = pd[0], width = num_panels * kPanel;
  const int64_t row_items = std::max<int64_t>(1, (rows + kRowsPerItem - 1) / kRowsPerItem);
  const float* xp = x.typed_data();
  const float* wp = panels.typed_data();
  float* yp = y->typed_data();
  // Items run panel-major, so the row blocks of one panel follow each other while it is cached.
  parallel_for(pool, num_panels * row_items, [&](int64_t item) {
    const int64_t p = item / row_items, r0 = (item % row_items) * kRowsPerItem;
    rows_by_panel(xp + r0 * depth, depth, std::min(kRowsPerItem, rows - r0),
                  wp + p * depth * kPanel, kPanel, depth, yp + r0 * width + p * kPanel, width);
  });
  return ffi::Error::Success();
}

// Scores of `rows` scaled queries q[rows, D] against 16 keys k[16, D] (row stride D): out[r, 16].
void scores16(const float* q, int64_t rows, const float* k, int64_t head_dim, float* out,
              int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    f32x16 acc[kLanes] = {};
    for (int64_t d = 0; d < head_dim; d += kLanes) {
      f32x16 qv = load(q + r * head_dim + d);
      for (int j = 0; j < kLanes; ++j) acc[j] += qv * load(k + j * head_dim + d);
    }
    store(out + r * ldo, lane_sums(acc));
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> filled,
                           ffi::Buffer<ffi::PRED> chunk_mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto md = chunk_mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || !same_dims(v.dimensions(), kd) || kd[0] != qd[0] ||
      kd[3] != qd[3] || qd[2] % kd[1] || md.size() != 3 || md[0] != qd[0] || md[1] != qd[1] ||
      md[2] != qd[1] || filled.dimensions().size() != 1 || filled.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument(
        "decode_attention: q [B, T, H, D], k and v [B, Hkv, S, D], filled [B], chunk_mask "
        "[B, T, T] expected");
  const int64_t batch = qd[0], num_new = qd[1], num_heads = qd[2], head_dim = qd[3];
  const int64_t num_kv_heads = kd[1], capacity = kd[2], group = num_heads / num_kv_heads;
  const int64_t rows = group * num_new;  // query rows of a KV head: row = t * group + g
  if (head_dim % kPanel || capacity % kLanes)
    return ffi::Error::InvalidArgument(
        "decode_attention: head_dim must be a multiple of 64 and the capacity of 16");
  const int32_t* filled_p = filled.typed_data();
  const bool* mask_p = chunk_mask.typed_data();
  // Keys that some query may see: [0, filled + T), within the capacity.
  std::vector<int64_t> ends(batch);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    ends[b] = std::clamp<int64_t>(int64_t{filled_p[b]} + num_new, 0, capacity);
    longest = std::max(longest, ends[b]);
  }
  const int64_t splits = std::max<int64_t>(1, (longest + kSplitKeys - 1) / kSplitKeys);
  const int64_t items = batch * num_kv_heads * splits;
  // Per item and query row: the running max, the sum of exp, and the unnormalized output.
  std::vector<float> maxes(items * rows), sums(items * rows), partial(items * rows * head_dim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  parallel_for(pool, items, [&](int64_t item) {
    const int64_t b = item / (num_kv_heads * splits), h = (item / splits) % num_kv_heads;
    const int64_t s0 = (item % splits) * kSplitKeys;
    const int64_t s1 = std::min(ends[b], s0 + kSplitKeys);
    float* item_max = maxes.data() + item * rows;
    float* item_sum = sums.data() + item * rows;
    float* item_out = partial.data() + item * rows * head_dim;
    std::fill(item_max, item_max + rows, kNegInf);
    std::fill(item_sum, item_sum + rows, 0.0f);
    std::fill(item_out, item_out + rows * head_dim, 0.0f);
    if (s1 <= s0) return;
    const int64_t first = filled_p[b];
    const int64_t span = ((s1 - s0 + kLanes - 1) / kLanes) * kLanes;  // within the capacity
    std::vector<float> queries(rows * head_dim), probs(rows * span);
    for (int64_t t = 0; t < num_new; ++t)
      for (int64_t g = 0; g < group; ++g) {
        const float* src = q.typed_data() + ((b * num_new + t) * num_heads + h * group + g) * head_dim;
        float* dst = queries.data() + (t * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = src[d] * scale;
      }
    const float* keys = k.typed_data() + ((b * num_kv_heads + h) * capacity + s0) * head_dim;
    const float* values = v.typed_data() + ((b * num_kv_heads + h) * capacity + s0) * head_dim;
    for (int64_t j = 0; j < span; j += kLanes)
      scores16(queries.data(), rows, keys + j * head_dim, head_dim, probs.data() + j, span);
    // Hide what a query may not see: keys past the item's range, and chunk keys outside its mask.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / group;
      float* row = probs.data() + r * span;
      for (int64_t j = std::max<int64_t>(0, first - s0); j < span; ++j) {
        const int64_t offset = s0 + j - first;  // >= 0 here: a chunk key, or past the range
        if (s0 + j >= s1 || !mask_p[(b * num_new + t) * num_new + offset]) row[j] = kNegInf;
      }
      f32x16 top = splat(kNegInf);
      for (int64_t j = 0; j < span; j += kLanes) {
        f32x16 s = load(row + j);
        top = s > top ? s : top;
      }
      float row_max = kNegInf;
      for (int i = 0; i < kLanes; ++i) row_max = std::max(row_max, top[i]);
      if (row_max == kNegInf) {  // this query sees no key of the range
        std::fill(row, row + span, 0.0f);
        continue;
      }
      f32x16 total = {};
      for (int64_t j = 0; j < span; j += kLanes) {
        f32x16 p = exp_nonpositive(load(row + j) - row_max);
        store(row + j, p);
        total += p;
      }
      float sum = 0.0f;
      for (int i = 0; i < kLanes; ++i) sum += total[i];
      item_max[r] = row_max;
      item_sum[r] = sum;
    }
    for (int64_t c = 0; c < head_dim; c += kPanel)  // probs [rows, span] @ values [span, D]
      rows_by_panel(probs.data(), span, rows, values + c, head_dim, span, item_out + c, head_dim);
  });

  // Merge each (row, KV head)'s key ranges: rescale to the global max, sum, normalize.
  float* out_p = out->typed_data();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = (b * num_kv_heads + h) * splits;
        float top = kNegInf;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, maxes[(base + s) * rows + r]);
        const int64_t t = r / group, g = r % group;
        float* dst = out_p + ((b * num_new + t) * num_heads + h * group + g) * head_dim;
        std::fill(dst, dst + head_dim, 0.0f);
        if (top == kNegInf) continue;  // no visible key: zeros, as the jnp path returns
        float denom = 0.0f;
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t i = (base + s) * rows + r;
          if (maxes[i] == kNegInf) continue;
          const float weight = std::exp(maxes[i] - top);
          denom += weight * sums[i];
          const float* src = partial.data() + i * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] += weight * src[d];
        }
        for (int64_t d = 0; d < head_dim; ++d) dst[d] /= denom;
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(budgetdraft_panel_matmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(budgetdraft_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
