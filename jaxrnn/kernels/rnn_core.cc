// The recurrence of jaxrnn's rnn, gru and lstm layers on a CPU, as XLA FFI handlers.
//
// A layer's time-parallel work (the input projection gx = x W_ih + b; in the backward pass
// dW_ih, dW_hh, db and dx) is a few large matrix products over all t*b rows, which XLA runs
// (jaxrnn/kernels/__init__.py). What is left is sequential: per time step one small product of
// the carried state with the recurrent weight W_hh, and the cell's pointwise on the gates.
// This file runs that loop: W_hh is packed once per call into panels (blocks of units, whole
// vectors), and per step each panel takes its product with the state and at once applies the
// pointwise to it, so the gates never make a second pass through memory. Rows are independent,
// so the batch's rows are split into parts, one per thread, each running every step alone.
//
// Handlers, for cell in {lstm, gru, rnn_tanh, rnn_relu} (float32, row-major, batch-major):
//   jaxrnn_core_<cell>_infer: gx[b, t, G h], w_hh[h, G h], [b_hn[h]], h0[b, h], [c0[b, h]]
//                             -> ys[b, t, h], hT[b, h], [cT[b, h]]
//   jaxrnn_core_<cell>_train: the same -> the same, aux[t, b, hp, A] (the gates the backward
//                             pass reads; hp = h rounded up to whole vectors)
//   jaxrnn_core_<cell>_grad:  w_hh, h0, [c0], ys, aux, d_ys, d_hT, [d_cT]
//                             -> d_gx[b, t, G h], [d_gh[b, t, G h]: gru], d_h0, [d_c0]
// with G gates per unit (lstm 4: i f g o; gru 3: r z n; rnn 1) in PyTorch's order, gx
// including the biases, d_gx the gradient of the gates' pre-activations and (gru) d_gh that of
// h W_hh + (0, 0, b_hn), from which XLA takes dW_hh and db_hn. Each handler also comes as
// <name>_bf16 (model.compute_dtype=bfloat16): the same, with the per-step products taking
// bfloat16 operands (W_hh, and the state or the gate gradients, rounded to nearest even) and
// summing in float32.
//
// The vectors are GCC vector extensions of kW floats; setup.py builds this file once per ISA
// (AVX-512 with AVX512-BF16, AVX-512: 16 floats; AVX2 + FMA: 8), and Python loads the fastest
// build the CPU runs. exp and tanh are vectorized here (Cephes' exp, Eigen's rational tanh): a
// few float32 ulps, which the tests bound against XLA and PyTorch. Threads: the caller and
// those of XLA's own intra-op threads that are free to take a part (`Team`; no thread of ours,
// no OpenMP, so nothing competes with XLA's workers for the cores): no barrier between steps,
// so a thread that loses its core delays its own rows only; results do not depend on which
// thread ran a part.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifndef JAXRNN_VECTOR_FLOATS
#error "setup.py sets JAXRNN_VECTOR_FLOATS (16 with -mavx512f, 8 with -mavx2 -mfma)"
#endif
constexpr int kW = JAXRNN_VECTOR_FLOATS;   // floats per vector
constexpr int kRegs = kW == 16 ? 32 : 16;  // vector registers
typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef float vfu __attribute__((vector_size(kW * 4), aligned(4)));  // unaligned access

inline vf Load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void Store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
template <size_t... I>
inline vf SplatLanes(float s, std::index_sequence<I...>) { return vf{((void)I, s)...}; }
inline vf Splat(float s) { return SplatLanes(s, std::make_index_sequence<kW>{}); }
template <size_t... I>
inline vi IotaLanes(std::index_sequence<I...>) { return vi{static_cast<int32_t>(I)...}; }
inline vi Iota() { return IotaLanes(std::make_index_sequence<kW>{}); }  // 0, 1, ..., kW - 1
// Each gives b when either is NaN (the comparison is false): a clamp Min(hi, Max(lo, x)) keeps
// a NaN x a NaN, as XLA's functions do, where Min(Max(x, lo), hi) would make it lo.
inline vf Min(vf a, vf b) { return a < b ? a : b; }
inline vf Max(vf a, vf b) { return a > b ? a : b; }

// The first n <= kW floats at p; the rest 0 (the last, partial vector of a row of units).
inline vf LoadN(const float* p, int n) {
  if (n == kW) return Load(p);
  float lanes[kW] = {};
  std::memcpy(lanes, p, n * sizeof(float));
  return Load(lanes);
}

inline void StoreN(float* p, vf v, int n) {
  if (n == kW) return Store(p, v);
  float lanes[kW];
  Store(lanes, v);
  std::memcpy(p, lanes, n * sizeof(float));
}

// e^x (Cephes' expf: n = round(x / ln 2), a degree-6 polynomial of the rest, times 2^n).
inline vf Exp(vf x) {
  x = Min(Splat(88.0f), Max(Splat(-87.3f), x));  // 2^n stays a normal float
  const vf shifter = Splat(12582912.0f);           // 1.5 * 2^23: rounds to an integer
  const vf t = x * Splat(1.44269504088896341f) + shifter;
  const vf n = t - shifter;
  const vf r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  vf p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * (r * r) + r + Splat(1.0f);
  const vi two_n = ((reinterpret_cast<const vi&>(t) - 0x4B400000) + 127) << 23;
  return p * reinterpret_cast<const vf&>(two_n);
}

inline vf Sigmoid(vf x) { return Splat(1.0f) / (Splat(1.0f) + Exp(-x)); }

// tanh(x) as Eigen's (and XLA's) float rational approximation x P(x^2) / Q(x^2).
inline vf Tanh(vf x) {
  x = Min(Splat(7.90531110763549805f), Max(Splat(-7.90531110763549805f), x));
  const vf x2 = x * x;
  vf p = Splat(-2.76076847742355e-16f);
  p = p * x2 + Splat(2.00018790482477e-13f);
  p = p * x2 + Splat(-8.60467152213735e-11f);
  p = p * x2 + Splat(5.12229709037114e-08f);
  p = p * x2 + Splat(1.48572235717979e-05f);
  p = p * x2 + Splat(6.37261928875436e-04f);
  p = p * x2 + Splat(4.89352455891786e-03f);
  vf q = Splat(1.19825839466702e-06f);
  q = q * x2 + Splat(1.18534705686654e-04f);
  q = q * x2 + Splat(2.26843463243900e-03f);
  q = q * x2 + Splat(4.89352518554385e-03f);
  return x * p / q;
}

// ------------------------------------------------------------------------- bfloat16 operands

// With compute_dtype=bfloat16 the per-step products take bfloat16 operands and accumulate in
// float32; the state, the gates and everything pointwise stay float32. A vector of operands
// holds kW lanes of two bfloat16 each, consecutive k in one lane, the even k in its low half:
// the layout of AVX512-BF16's dot product, which the build for CPUs that have it runs
// (JAXRNN_BF16_DOT); the other builds take the same two products with FMAs.
typedef uint16_t bf16;
typedef uint32_t vu __attribute__((vector_size(kW * 4)));
typedef uint16_t vh __attribute__((vector_size(kW * 2)));
typedef uint16_t vhu __attribute__((vector_size(kW * 2), aligned(2), may_alias));

// c + a_odd b_odd + a_even b_even, lane by lane (a, b: pairs of bfloat16).
inline vf Dot2(vf c, vf a, vf b) {
#ifdef JAXRNN_BF16_DOT
  return std::bit_cast<vf>(_mm512_dpbf16_ps(std::bit_cast<__m512>(c), std::bit_cast<__m512bh>(a),
                                            std::bit_cast<__m512bh>(b)));
#else
  const vu ai = std::bit_cast<vu>(a), bi = std::bit_cast<vu>(b), mask = vu{} + 0xFFFF0000u;
  c += std::bit_cast<vf>(ai & mask) * std::bit_cast<vf>(bi & mask);
  return c + std::bit_cast<vf>(ai << 16) * std::bit_cast<vf>(bi << 16);
#endif
}

// float32 -> bfloat16 rounded to the nearest even, in the low half of a lane. A NaN keeps its
// sign and top fraction bits and is made quiet, so it stays a NaN (as in XLA's conversion):
// rounding its bits could carry into the exponent or past it, to an infinity or a zero.
inline vu Bf16Bits(vf x) {
  const vu bits = std::bit_cast<vu>(x);
  return x != x ? (bits >> 16) | 0x40 : (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
}

inline bf16 ToBf16(float x) { return static_cast<bf16>(Bf16Bits(Splat(x))[0]); }

// Two bfloat16 as one 32-bit lane (lo: the even k).
inline float Pair(float lo, float hi) {
  return std::bit_cast<float>(static_cast<uint32_t>(ToBf16(lo)) |
                              static_cast<uint32_t>(ToBf16(hi)) << 16);
}

// The first n <= kW lanes of v as bfloat16 at p.
inline void StoreBf16(bf16* p, vf v, int n) {
  const vh h = __builtin_convertvector(Bf16Bits(v), vh);
  if (n == kW) {
    *reinterpret_cast<vhu*>(p) = h;
    return;
  }
  bf16 lanes[kW];
  *reinterpret_cast<vhu*>(lanes) = h;
  std::memcpy(p, lanes, n * sizeof(bf16));
}

// ------------------------------------------------------------------------------------ threads

// The threads of one call: the calling thread and XLA's intra-op threads that are free to join
// (XLA's own pool, so that no thread of ours competes with its workers for the cores).
// Run(n, fn) runs fn(task) for task in [0, n): tasks are claimed one at a time from a shared
// counter, so a helper that arrives late, or never, holds back at most the task it took, and
// results do not depend on which thread ran a task.
class Team {
 public:
  explicit Team(ffi::ThreadPool pool) : pool_(pool), size_(Threads(pool)) {}

  int size() const { return size_; }

  void Run(int n, const std::function<void(int)>& fn) {
    if (n == 1 || size_ == 1) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    // Shared with the helpers, which may start after this call has returned.
    auto job = std::make_shared<Job>();
    job->n = n;
    job->fn = &fn;
    for (int i = 1; i < std::min(size_, n); ++i) pool_.Schedule([job] { job->Work(); });
    job->Work();
    // Wait for the helpers' tasks; yield after a while, in case one of them shares our core.
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      _mm_pause();
      if ((spins & 255) == 255 &&
          std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) {
        std::this_thread::yield();
      }
    }
  }

 private:
  struct Job {
    int n = 0;
    const std::function<void(int)>* fn = nullptr;  // read only while a task is unfinished
    std::atomic<int> next{0}, done{0};
    void Work() {
      int mine = 0;
      for (int task; (task = next.fetch_add(1, std::memory_order_acq_rel)) < n; ++mine) {
        (*fn)(task);
      }
      if (mine) done.fetch_add(mine, std::memory_order_acq_rel);
    }
  };

  // XLA's intra-op threads, at most JAXRNN_CORE_THREADS.
  static int Threads(ffi::ThreadPool& pool) {
    int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
    if (const char* env = std::getenv("JAXRNN_CORE_THREADS")) {
      threads = std::min(threads, std::max(1, atoi(env)));
    }
    return threads;
  }

  ffi::ThreadPool pool_;
  int size_;
};

// --------------------------------------------------------------------------------- the tiles

// Elements of an operand per k step of a tile: a float, or a pair of bfloat16.
template <class T>
constexpr int kPerStep = std::is_same_v<T, float> ? 1 : 2;

// Rows per tile for NV vectors per row, and the order of a k step that allows the most: the
// panel's NV vectors first, then each row's splat (NV vectors and a splat beside the MR * NV
// sums, and a spare), or (float operands) every row's splat first, then each panel vector (MR
// splats and a vector). They tie on AVX-512; on AVX2's 16 registers an LSTM's forward panel
// (NV = 4) takes 3 rows splats first, 2 the other way, whose k step then loads 4 panel vectors
// for 8 multiply-adds.
constexpr int PanelFirstRows(int nv) { return std::min(8, (kRegs - nv - 2) / nv); }
constexpr int SplatsFirstRows(int nv) { return std::min(8, (kRegs - 1) / (nv + 1)); }
template <class T>
constexpr bool SplatsFirst(int nv) {
  return std::is_same_v<T, float> && SplatsFirstRows(nv) > PanelFirstRows(nv);
}
template <class T>
constexpr int RowsFor(int nv) {
  return SplatsFirst<T>(nv) ? SplatsFirstRows(nv) : PanelFirstRows(nv);
}

// acc[r * NV + v] += sum_k a[r * lda + k] bp[(k * NV + v) * kW ...]: MR rows of A (row-major,
// lda elements of T) times a packed panel of NV vectors per k step (float32, or pairs of
// bfloat16 against A's pairs). The sum runs in k order, whatever the thread.
template <int MR, int NV, class T>
[[gnu::always_inline]] inline void Tile(const T* __restrict__ a, long lda, long k_size,
                                        const float* __restrict__ bp, vf* __restrict__ acc) {
  vf c[MR][NV];  // in registers
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = acc[r * NV + v];
  if constexpr (SplatsFirst<T>(NV)) {  // float operands only
    for (long k = 0; k < k_size; ++k) {
      vf av[MR];
      for (int r = 0; r < MR; ++r) av[r] = Splat(a[r * lda + k]);
      for (int v = 0; v < NV; ++v) {
        const vf b = Load(bp + (k * NV + v) * kW);
        for (int r = 0; r < MR; ++r) c[r][v] += av[r] * b;
      }
    }
  } else {
    for (long k = 0; k < k_size; ++k) {
      vf b[NV];
      for (int v = 0; v < NV; ++v) b[v] = Load(bp + (k * NV + v) * kW);
      for (int r = 0; r < MR; ++r) {
        if constexpr (std::is_same_v<T, float>) {
          const vf av = Splat(a[r * lda + k]);
          for (int v = 0; v < NV; ++v) c[r][v] += av * b[v];
        } else {
          float pair;
          std::memcpy(&pair, a + r * lda + 2 * k, sizeof(pair));
          const vf av = Splat(pair);
          for (int v = 0; v < NV; ++v) c[r][v] = Dot2(c[r][v], av, b[v]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = c[r][v];
}

// A panel's product and pointwise for rows [0, rows): prefetch(row) asks for what finish will
// read of a row, then acc = a (rows x k_size steps of T, lda elements) times the packed panel
// bp (0 when a is null), and finish(row, acc) uses a row's NV vectors. The product runs in
// blocks of k whose slice of the panel (16 KB) stays in the L1 cache while every tile of rows
// passes over it; the prefetches, issued first, arrive while it runs (the rows of a step lie a
// sequence apart).
template <int NV, class T, class Prefetch, class Finish>
void Rows(int rows, const T* a, long lda, long k_size, const float* bp,
          const Prefetch& prefetch, const Finish& finish) {
  constexpr int MR = RowsFor<T>(NV);
  constexpr long kBlock = std::max(32, 16384 / (NV * kW * 4));
  thread_local std::vector<vf> buffer;
  if (buffer.size() < static_cast<size_t>(rows) * NV) buffer.resize(static_cast<size_t>(rows) * NV);
  vf* acc = buffer.data();
  for (int r = 0; r < rows; ++r) prefetch(r);
  std::fill(acc, acc + static_cast<size_t>(rows) * NV, vf{});
  for (long k0 = 0; a != nullptr && k0 < k_size; k0 += kBlock) {
    const long kn = std::min(kBlock, k_size - k0);
    const float* panel = bp + k0 * NV * kW;
    int row = 0;
    const T* a0 = a + k0 * kPerStep<T>;
    for (; row + MR <= rows; row += MR) {
      Tile<MR, NV>(a0 + row * lda, lda, kn, panel, acc + row * NV);
    }
    if constexpr (MR > 1) {
      if (row < rows) {  // the rest, as a tile of that many rows
        [&]<int... R>(std::integer_sequence<int, R...>) {
          ((rows - row == R + 1
                ? (Tile<R + 1, NV>(a0 + row * lda, lda, kn, panel, acc + row * NV), 0)
                : 0),
           ...);
        }(std::make_integer_sequence<int, MR - 1>{});
      }
    }
  }
  for (int r = 0; r < rows; ++r) finish(r, acc + r * NV);
}

// ---------------------------------------------------------------------------------- the cells

// A cell's sizes. A forward panel holds kUnitVectors vectors of units and packs NV = kGates *
// kUnitVectors vectors per k (gate-major); a backward panel holds kBackVectors vectors of
// units. aux holds kAux vectors per unit vector, row and step (what the backward pass reads).
struct Lstm {
  static constexpr int kGates = 4, kUnitVectors = 1, kAux = 5, kBackVectors = 2;
  static constexpr bool kCell = true, kTwoGrads = false;
};
struct Gru {
  static constexpr int kGates = 3, kUnitVectors = 1, kAux = 4, kBackVectors = 2;
  static constexpr bool kCell = false, kTwoGrads = true;
};
template <bool kRelu>
struct Rnn {
  static constexpr int kGates = 1, kUnitVectors = 4, kAux = 0, kBackVectors = 2;
  static constexpr bool kCell = false, kTwoGrads = false;
};

template <class C>
struct Shape {
  long b, t, h;
  long hp() const { return (h + kW - 1) / kW * kW; }  // units, padded to whole vectors
  long g() const { return C::kGates * h; }             // gate columns
  int unit_vectors() const { return static_cast<int>(hp() / kW); }
  int forward_panels() const { return (unit_vectors() + C::kUnitVectors - 1) / C::kUnitVectors; }
  int backward_panels() const { return (unit_vectors() + C::kBackVectors - 1) / C::kBackVectors; }
  int lanes(int unit_vector) const {  // real units in a vector: kW, or fewer in the last
    return static_cast<int>(std::min<long>(kW, h - static_cast<long>(unit_vector) * kW));
  }
};

// Per-thread scratch, grown when a call needs more and otherwise reused.
float* Scratch(int use, size_t floats) {
  thread_local std::vector<float> buffers[5];
  if (buffers[use].size() < floats) buffers[use].resize(floats);
  return buffers[use].data();
}

// The batch's rows in contiguous parts, one per thread of the team: rows are independent, so
// each part runs every time step on its own, with no wait between steps.
int Parts(const Team& team, long b) { return static_cast<int>(std::min<long>(team.size(), b)); }
long PartStart(long b, int parts, int part) { return b * part / parts; }

// W_hh[h, G h] -> forward panels [panel][k step < hp / kPerStep][gate][unit vector][kW], zero
// past h; a lane holds W_hh[k, unit], or (bfloat16) the pair W_hh[2k, unit], W_hh[2k + 1, unit].
template <class C, class T>
const float* PackForward(Team& team, const Shape<C>& s, const float* w) {
  constexpr int NV = C::kGates * C::kUnitVectors, per = kPerStep<T>;
  const long hp = s.hp(), g = s.g();
  const long steps = hp / per;
  float* packed = Scratch(0, static_cast<size_t>(s.forward_panels()) * steps * NV * kW);
  auto at = [&](long k, long column) { return k < s.h ? w[k * g + column] : 0.0f; };
  team.Run(s.forward_panels(), [&](int panel) {
    float* out = packed + static_cast<long>(panel) * steps * NV * kW;
    for (long k = 0; k < steps; ++k) {
      for (int gate = 0; gate < C::kGates; ++gate) {
        for (int u = 0; u < C::kUnitVectors; ++u, out += kW) {
          const int uv = panel * C::kUnitVectors + u;
          const int n = uv < s.unit_vectors() ? s.lanes(uv) : 0;
          const long column = gate * s.h + uv * kW;
          std::memset(out, 0, kW * sizeof(float));
          if constexpr (per == 1) {
            if (n > 0 && k < s.h) std::memcpy(out, w + k * g + column, n * sizeof(float));
          } else {
            for (int lane = 0; lane < n; ++lane) {
              out[lane] = Pair(at(2 * k, column + lane), at(2 * k + 1, column + lane));
            }
          }
        }
      }
    }
  });
  return packed;
}

// W_hh^T[G h, h] -> backward panels [panel][k step < gp / kPerStep][unit vector][kW], zero past
// h and past G h (gp: G h, rounded up to whole k steps).
template <class C, class T>
const float* PackBackward(Team& team, const Shape<C>& s, const float* w) {
  constexpr int NV = C::kBackVectors, per = kPerStep<T>;
  const long g = s.g(), steps = (g + per - 1) / per;
  float* packed = Scratch(1, static_cast<size_t>(s.backward_panels()) * steps * NV * kW);
  team.Run(s.backward_panels(), [&](int panel) {
    float* out = packed + static_cast<long>(panel) * steps * NV * kW;
    std::memset(out, 0, steps * NV * kW * sizeof(float));
    for (int v = 0; v < NV; ++v) {
      const int uv = panel * NV + v;
      if (uv >= s.unit_vectors()) continue;
      for (int lane = 0; lane < s.lanes(uv); ++lane) {
        const float* row = w + (static_cast<long>(uv) * kW + lane) * g;
        auto at = [&](long k) { return k < g ? row[k] : 0.0f; };
        for (long k = 0; k < steps; ++k) {
          out[(k * NV + v) * kW + lane] = per == 1 ? at(k) : Pair(at(2 * k), at(2 * k + 1));
        }
      }
    }
  });
  return packed;
}

// ------------------------------------------------------------------------------- forward pass

struct ForwardIo {
  const float *gx, *w, *b_hn, *h0, *c0;
  float *ys, *h_last, *c_last, *aux;  // aux: null in inference
};

template <class C, class T>
void Forward(Team& team, const Shape<C>& s, const ForwardIo& io) {
  constexpr int NV = C::kGates * C::kUnitVectors;
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const long b = s.b, t_size = s.t, h = s.h, hp = s.hp(), g = s.g();
  const float* packed = PackForward<C, T>(team, s, io.w);
  // The carried state, padded to hp units with zeros (which stay zero: their weights are 0).
  float* h_prev = Scratch(2, 2 * b * hp);
  float* h_next = h_prev + b * hp;
  float* c = Scratch(3, b * hp);
  std::memset(h_prev, 0, 2 * b * hp * sizeof(float));
  std::memset(c, 0, b * hp * sizeof(float));
  for (long r = 0; r < b; ++r) {
    std::memcpy(h_prev + r * hp, io.h0 + r * h, h * sizeof(float));
    if (C::kCell) std::memcpy(c + r * hp, io.c0 + r * h, h * sizeof(float));
  }
  // bfloat16: the state as the products' operand, beside its float32 self (this step's and the
  // next one's, as h_prev and h_next).
  bf16* h16_prev = kBf16 ? reinterpret_cast<bf16*>(Scratch(4, b * hp)) : nullptr;
  bf16* h16_next = kBf16 ? h16_prev + b * hp : nullptr;
  if constexpr (kBf16) {
    for (long i = 0; i < b * hp; i += kW) StoreBf16(h16_prev + i, Load(h_prev + i), kW);
  }
  const int parts = Parts(team, b);
  team.Run(parts, [&](int part) {
    const long r0 = PartStart(b, parts, part), rows = PartStart(b, parts, part + 1) - r0;
    float* mine = h_prev + r0 * hp;  // this part's rows of the state, and of the next one
    float* next = h_next + r0 * hp;
    bf16* mine16 = kBf16 ? h16_prev + r0 * hp : nullptr;
    bf16* next16 = kBf16 ? h16_next + r0 * hp : nullptr;
    for (long t = 0; t < t_size; ++t) {
      for (int panel = 0; panel < s.forward_panels(); ++panel) {
        const float* bp = packed + static_cast<long>(panel) * (hp / kPerStep<T>) * NV * kW;
        auto prefetch = [&](int r) {
          const float* gx = io.gx + ((r0 + r) * t_size + t) * g;
          for (int gate = 0; gate < C::kGates; ++gate) {
            for (int u = 0; u < C::kUnitVectors; ++u) {
              __builtin_prefetch(gx + gate * h + (panel * C::kUnitVectors + u) * kW);
            }
          }
        };
        auto finish = [&](int r, vf* acc) {
          const long row = r0 + r;
          const float* gx = io.gx + (row * t_size + t) * g;
          for (int u = 0; u < C::kUnitVectors; ++u) {
            const int uv = panel * C::kUnitVectors + u;
            if (uv >= s.unit_vectors()) continue;
            const int n = s.lanes(uv);
            auto gate_in = [&](int gate) { return LoadN(gx + gate * h + uv * kW, n); };
            const long at = r * hp + uv * kW;  // in this part's rows
            float* aux = io.aux == nullptr ? nullptr
                                           : io.aux + ((t * b + row) * hp + uv * kW) * C::kAux;
            vf out;
            if constexpr (C::kGates == 4) {  // lstm
              const vf i = Sigmoid(acc[0] + gate_in(0)), f = Sigmoid(acc[1] + gate_in(1)),
                       gg = Tanh(acc[2] + gate_in(2)), o = Sigmoid(acc[3] + gate_in(3));
              float* cell = c + r0 * hp + at;
              const vf cn = f * Load(cell) + i * gg;
              out = o * Tanh(cn);
              Store(cell, cn);
              if (aux) {
                Store(aux, i), Store(aux + kW, f), Store(aux + 2 * kW, gg);
                Store(aux + 3 * kW, o), Store(aux + 4 * kW, cn);
              }
            } else if constexpr (C::kGates == 3) {  // gru
              const vf z = Sigmoid(acc[1] + gate_in(1)), r_ = Sigmoid(acc[0] + gate_in(0));
              const vf hn = acc[2] + LoadN(io.b_hn + uv * kW, n);
              const vf nn = Tanh(gate_in(2) + r_ * hn);
              out = nn + z * (Load(mine + at) - nn);
              if (aux) {
                Store(aux, r_), Store(aux + kW, z), Store(aux + 2 * kW, nn);
                Store(aux + 3 * kW, hn);
              }
            } else {  // rnn
              const vf pre = acc[u] + gate_in(0);
              if constexpr (std::is_same_v<C, Rnn<true>>) {
                out = Max(vf{}, pre);  // a NaN pre stays NaN (see Max)
              } else {
                out = Tanh(pre);
              }
            }
            // Padding units stay 0, which their gx, weights and state give unless a unit of the
            // state is infinite: inf times W_hh's zero padding is NaN, which the next step's
            // product (NaN times zero weights) would spread to every unit.
            if (n < kW) out = Iota() < n ? out : vf{};
            Store(next + at, out);
            if constexpr (kBf16) StoreBf16(next16 + at, out, kW);
            StoreN(io.ys + (row * t_size + t) * h + uv * kW, out, n);
          }
        };
        if constexpr (kBf16) {
          Rows<NV>(static_cast<int>(rows), mine16, hp, hp / 2, bp, prefetch, finish);
        } else {
          Rows<NV>(static_cast<int>(rows), mine, hp, hp, bp, prefetch, finish);
        }
      }
      std::swap(mine, next);
      std::swap(mine16, next16);
    }
    for (long r = 0; r < rows; ++r) {
      std::memcpy(io.h_last + (r0 + r) * h, mine + r * hp, h * sizeof(float));
      if (C::kCell) std::memcpy(io.c_last + (r0 + r) * h, c + (r0 + r) * hp, h * sizeof(float));
    }
  });
}

// ------------------------------------------------------------------------------ backward pass

struct BackwardIo {
  const float *w, *h0, *c0, *ys, *aux, *d_ys, *d_h_last, *d_c_last;
  float *d_gx, *d_gh, *d_h0, *d_c0;  // d_gh: gru only
};

// Per step, from the last: dh = dy_t + (the next step's gate gradient) W_hh^T (+ the gru's
// direct path dh_{t+1} z), then the cell's pointwise gives this step's gate gradients. A final
// product gives d_h0.
template <class C, class T>
void Backward(Team& team, const Shape<C>& s, const BackwardIo& io) {
  constexpr int NV = C::kBackVectors;
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const long b = s.b, t_size = s.t, h = s.h, hp = s.hp(), g = s.g();
  const long k_steps = (g + kPerStep<T> - 1) / kPerStep<T>;
  const float* packed = PackBackward<C, T>(team, s, io.w);
  // bfloat16: each step's gate gradients (those that meet W_hh^T) as the next step's operand,
  // two by the step's parity, rows of gp (G h rounded up to whole pairs; the rest 0).
  const long gp = 2 * k_steps;
  bf16* dg16 = kBf16 ? reinterpret_cast<bf16*>(Scratch(4, b * gp)) : nullptr;
  if constexpr (kBf16) std::memset(dg16, 0, 2 * b * gp * sizeof(bf16));
  auto operand16 = [&](long step) { return dg16 + (step & 1) * b * gp; };
  // dc (lstm) or the direct path dh * z (gru), per padded unit; rnn needs neither.
  float* carried = Scratch(2, b * hp);
  std::memset(carried, 0, b * hp * sizeof(float));
  if (C::kCell) {
    for (long r = 0; r < b; ++r) std::memcpy(carried + r * hp, io.d_c_last + r * h, h * sizeof(float));
  }
  const float* product_source = C::kTwoGrads ? io.d_gh : io.d_gx;  // what meets W_hh^T
  const int parts = Parts(team, b);
  team.Run(parts, [&](int part) {
  const long r0 = PartStart(b, parts, part), rows = PartStart(b, parts, part + 1) - r0;
  for (long step = t_size - 1; step >= -1; --step) {  // step -1: the pass that gives d_h0
    const bool first = step == t_size - 1, last_pass = step == -1;
    for (int panel = 0; panel < s.backward_panels(); ++panel) {
      const float* bp = packed + static_cast<long>(panel) * k_steps * NV * kW;
      auto prefetch = [&](int r) {
        const long row = r0 + r;
        for (int v = 0; v < NV && !last_pass; ++v) {
          const long uv = panel * NV + v;
          __builtin_prefetch(io.d_ys + (row * t_size + step) * h + uv * kW);
          if (C::kAux) {
            const float* aux = io.aux + ((step * b + row) * hp + uv * kW) * C::kAux;
            for (int q = 0; q < C::kAux; ++q) __builtin_prefetch(aux + q * kW);
          }
        }
      };
      auto finish = [&](int r, vf* acc) {
        const long row = r0 + r;
        for (int v = 0; v < NV; ++v) {
          const int uv = panel * NV + v;
          if (uv >= s.unit_vectors()) continue;
          const int n = s.lanes(uv);
          if (first) acc[v] += LoadN(io.d_h_last + row * h + uv * kW, n);
          if (!last_pass) acc[v] += LoadN(io.d_ys + (row * t_size + step) * h + uv * kW, n);
          if (C::kTwoGrads) acc[v] += Load(carried + row * hp + uv * kW);  // gru: dh_{t+1} z
          if (last_pass) {
            StoreN(io.d_h0 + row * h + uv * kW, acc[v], n);
            continue;
          }
          const vf dh = acc[v];
          const long at = row * hp + uv * kW;
          float* dg = io.d_gx + (row * t_size + step) * g + uv * kW;
          auto operand = [&](int gate, vf value) {  // bfloat16: for the next step's product
            if constexpr (kBf16) {
              StoreBf16(operand16(step) + row * gp + gate * h + uv * kW, value, n);
            }
          };
          if constexpr (C::kGates == 4) {  // lstm
            const float* aux = io.aux + ((step * b + row) * hp + uv * kW) * C::kAux;
            const vf i = Load(aux), f = Load(aux + kW), gg = Load(aux + 2 * kW),
                     o = Load(aux + 3 * kW), cn = Load(aux + 4 * kW);
            const vf cp = step == 0 ? LoadN(io.c0 + row * h + uv * kW, n)
                                    : Load(io.aux + (((step - 1) * b + row) * hp + uv * kW) *
                                                        C::kAux + 4 * kW);
            const vf tc = Tanh(cn);
            const vf dc = Load(carried + at) + dh * o * (Splat(1.0f) - tc * tc);
            const vf one = Splat(1.0f);
            const vf d[4] = {dc * gg * i * (one - i), dc * cp * f * (one - f),
                             dc * i * (one - gg * gg), dh * tc * o * (one - o)};
            for (int gate = 0; gate < 4; ++gate) {
              StoreN(dg + gate * h, d[gate], n);
              operand(gate, d[gate]);
            }
            Store(carried + at, dc * f);
          } else if constexpr (C::kGates == 3) {  // gru
            const float* aux = io.aux + ((step * b + row) * hp + uv * kW) * C::kAux;
            const vf r = Load(aux), z = Load(aux + kW), nn = Load(aux + 2 * kW),
                     hn = Load(aux + 3 * kW), one = Splat(1.0f);
            const vf hp_ = step == 0 ? LoadN(io.h0 + row * h + uv * kW, n)
                                     : LoadN(io.ys + (row * t_size + step - 1) * h + uv * kW, n);
            const vf dpn = dh * (one - z) * (one - nn * nn);
            const vf dpr = dpn * hn * r * (one - r);
            const vf dpz = dh * (hp_ - nn) * z * (one - z);
            float* dgh = io.d_gh + (row * t_size + step) * g + uv * kW;
            StoreN(dg, dpr, n), StoreN(dg + h, dpz, n), StoreN(dg + 2 * h, dpn, n);
            StoreN(dgh, dpr, n), StoreN(dgh + h, dpz, n), StoreN(dgh + 2 * h, dpn * r, n);
            operand(0, dpr), operand(1, dpz), operand(2, dpn * r);
            Store(carried + at, dh * z);
          } else {  // rnn: the output is the state
            const vf y = LoadN(io.ys + (row * t_size + step) * h + uv * kW, n);
            vf dpre;
            if constexpr (std::is_same_v<C, Rnn<true>>) {
              dpre = y > vf{} ? dh : vf{};
            } else {
              dpre = dh * (Splat(1.0f) - y * y);
            }
            StoreN(dg, dpre, n);
            operand(0, dpre);
          }
        }
      };
      if constexpr (kBf16) {
        const bf16* a16 = first ? nullptr : operand16(step + 1) + r0 * gp;  // their copies
        Rows<NV>(static_cast<int>(rows), a16, gp, k_steps, bp, prefetch, finish);
      } else {  // the next step's gate gradients, this part's rows (at t * g apart)
        const float* a = first ? nullptr : product_source + (r0 * t_size + step + 1) * g;
        Rows<NV>(static_cast<int>(rows), a, t_size * g, g, bp, prefetch, finish);
      }
    }
  }
  });
  if (C::kCell) {
    for (long r = 0; r < b; ++r) std::memcpy(io.d_c0 + r * h, carried + r * hp, h * sizeof(float));
  }
}

// ------------------------------------------------------------------------------------ the FFI

float* Ptr(const ffi::AnyBuffer& buffer) {
  return static_cast<float*>(const_cast<void*>(buffer.untyped_data()));
}

template <class C>
Shape<C> ShapeOf(const ffi::AnyBuffer& seq, const ffi::AnyBuffer& h0) {
  const auto sd = seq.dimensions();
  return Shape<C>{sd[0], sd[1], h0.dimensions()[1]};
}

// Forward: args gx, w_hh, [b_hn], h0, [c0]; rets ys, hT, [cT], [aux]. T: the products' operands.
template <class C, bool kTrain, class T>
ffi::Error ForwardHandler(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto arg = [&](size_t i) { return args.get<ffi::AnyBuffer>(i).value(); };
  auto ret = [&](size_t i) { return Ptr(*rets.get<ffi::AnyBuffer>(i).value()); };
  const int gru = C::kTwoGrads, c = C::kCell;
  const Shape<C> s = ShapeOf<C>(arg(0), arg(2 + gru));
  ForwardIo io{Ptr(arg(0)), Ptr(arg(1)), gru ? Ptr(arg(2)) : nullptr, Ptr(arg(2 + gru)),
               c ? Ptr(arg(3 + gru)) : nullptr, ret(0), ret(1), c ? ret(2) : nullptr,
               kTrain && C::kAux ? ret(2 + c) : nullptr};
  if (s.t == 0) {  // no steps: the state passes through (XLA does not clear the outputs)
    std::memcpy(io.h_last, io.h0, s.b * s.h * sizeof(float));
    if (c) std::memcpy(io.c_last, io.c0, s.b * s.h * sizeof(float));
    return ffi::Error::Success();
  }
  Team team(pool);
  Forward<C, T>(team, s, io);
  return ffi::Error::Success();
}

// Backward: args w_hh, h0, [c0], ys, aux, d_ys, d_hT, [d_cT]; rets d_gx, [d_gh], d_h0, [d_c0].
template <class C, class T>
ffi::Error BackwardHandler(ffi::ThreadPool pool, ffi::RemainingArgs args,
                           ffi::RemainingRets rets) {
  auto arg = [&](size_t i) { return args.get<ffi::AnyBuffer>(i).value(); };
  auto ret = [&](size_t i) { return Ptr(*rets.get<ffi::AnyBuffer>(i).value()); };
  const int gru = C::kTwoGrads, c = C::kCell;
  const Shape<C> s = ShapeOf<C>(arg(2 + c), arg(1));
  BackwardIo io{Ptr(arg(0)),     Ptr(arg(1)),         c ? Ptr(arg(2)) : nullptr,
                Ptr(arg(2 + c)), Ptr(arg(3 + c)),     Ptr(arg(4 + c)),
                Ptr(arg(5 + c)), c ? Ptr(arg(6 + c)) : nullptr,
                ret(0),          gru ? ret(1) : nullptr, ret(1 + gru), c ? ret(2 + gru) : nullptr};
  if (s.t == 0) {  // no steps: the final state's gradient is the initial state's
    std::memcpy(io.d_h0, io.d_h_last, s.b * s.h * sizeof(float));
    if (c) std::memcpy(io.d_c0, io.d_c_last, s.b * s.h * sizeof(float));
    return ffi::Error::Success();
  }
  Team team(pool);
  Backward<C, T>(team, s, io);
  return ffi::Error::Success();
}

}  // namespace

#define JAXRNN_BINDING ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().RemainingRets()
#define JAXRNN_PASSES(cell, type, T, suffix)                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrnn_core_##cell##_infer##suffix,                              \
                                (ForwardHandler<type, false, T>), JAXRNN_BINDING);               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrnn_core_##cell##_train##suffix,                              \
                                (ForwardHandler<type, true, T>), JAXRNN_BINDING);                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrnn_core_##cell##_grad##suffix, (BackwardHandler<type, T>),   \
                                JAXRNN_BINDING)
#define JAXRNN_CORE(cell, type)   \
  JAXRNN_PASSES(cell, type, float, ); \
  JAXRNN_PASSES(cell, type, bf16, _bf16)

JAXRNN_CORE(lstm, Lstm);
JAXRNN_CORE(gru, Gru);
JAXRNN_CORE(rnn_tanh, Rnn<false>);
JAXRNN_CORE(rnn_relu, Rnn<true>);

// Floats per vector of this build (read by Python).
extern "C" int jaxrnn_core_vector_floats() { return kW; }
