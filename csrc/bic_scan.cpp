// fastopd._C: the batched ragged profiled RSS-BIC scan of docs/formulas.md §3, and its online replay (§8,
// online_scan, near the end of this file).
//
// For one series x_0..x_{n-1} (a rollout's segment means), with prefix sums S1, S2 of the centred series
// d_i = x_i - c (c = sum(x) / n):
//   RSS(a,b) = (S2[b] - S2[a]) - (S1[b] - S1[a])^2 / (b - a), clamped at 0
//   BIC0     = n ln(RSS(0,n)/n + eps) + 2 ln n
//   BIC1(t)  = n ln((RSS(0,t) + RSS(t,n))/n + eps) + 4 ln n   for t in [m, n-m] with mean(x[t:]) < mean(x[:t])
//   t* = argmin BIC1 (smallest t on ties), gain = BIC0 - BIC1(t*), accepted <=> gain > min_gain
//
// Every floating-point operation that produces a result is the one of fastopd.reference._scan_one, in the
// same order (setup.py compiles with -ffp-contract=off, so there is no fused multiply-add, and std::log is
// the libm log that Python's math.log calls), so the two agree bit for bit. The per-tau arithmetic runs
// as a branch-free, vectorised pass (candidate_y): IEEE +, -, *, / are correctly rounded per lane, so the
// vector width changes no bit. It is compiled with -fno-trapping-math (function attribute), which only lets
// GCC if-convert the comparisons (it stops caring about FP exception flags) and changes no value.
//
// Huge values (docs/formulas.md §3, "Decision (huge values)"): a series whose largest |x_i| lies in
// [2^(E-1), 2^E) (E from frexp) with E + bit_length(n) > kScaleLimit could overflow the centred squares and prefix
// sums, so it is scanned as x_i 2^-E (exact: a power of two; max |x_i 2^-E| < 1), and every log argument
// RSS/n + eps of the original series is evaluated from the scaled RSS'/n = q as ln(q 2^(2E) + eps) (log_scaled),
// so the gain is the formula's gain of the series as given. Every other series takes the unscaled path.
//
// One shortcut, which changes no result: BIC1(t) (a log) is evaluated only for the candidates whose log
// argument y_t = (RSS(0,t) + RSS(t,n))/n + eps is within a relative 1e-9 of the smallest one, y_min (usually
// a single candidate). For any other candidate the exact ln y_t - ln y_min > ~1e-9, far above the error of
// libm's log (< 1 ulp, and ln y lies in [-28, 710], where 1 ulp <= 1.2e-13), so the computed ln y_t >
// computed ln y_min; the gap (about 1e-9 n, relative >= 1e-12) also survives the rounding of n * ln y and of
// + 4 ln n, so the computed BIC1(t) > the computed BIC1 at y_min: t is neither the reference's argmin nor a
// tie with it. (Scaled series evaluate every candidate: there the log argument is not q alone.)

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace py = pybind11;

// No fused multiply-add in this file even if it is built without setup.py's -ffp-contract=off (an FMA
// rounds once where the reference rounds twice).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

constexpr double kBicEps = 1e-12;         // epsilon of docs/formulas.md §3 (reference.BIC_EPS)
constexpr double kSkipFactor = 1.0 + 1e-9;  // see the header comment: the log-skipping margin
// Scale a series when E + bit_length(n) > kScaleLimit (E: frexp exponent of max |x_i|, so |x_i| < 2^E): below it
// |d_i| < 2^(E+1), S2 < 2^(2E+k+3) and (S1[b] - S1[a])^2 < 2^(2E+2k+4) <= 2^1020 cannot overflow.
// (reference._SCALE_LIMIT)
constexpr int kScaleLimit = 508;

// Batches at least this large (rollouts, or values in total) run on several threads.
constexpr int64_t kParallelMinRollouts = 4096;
constexpr int64_t kParallelMinValues = int64_t(1) << 18;
constexpr int64_t kChunk = 256;  // most rollouts per dynamic-schedule chunk

struct ScanResult {
  int64_t release;
  double gain;
  bool accepted;
};

// Per-thread scratch, allocated once per call (before the GIL is released, so that a failed allocation is
// a MemoryError) and sized to the longest rollout: no allocation per rollout.
struct Scratch {
  std::vector<double> s1, s2;  // prefix sums S1, S2 of the centred series
  std::vector<double> ys;      // log argument of BIC1 per tau (NaN: no candidate)
  std::vector<double> xs;      // the scaled copy of a series with huge values
  explicit Scratch(int64_t max_n) : s1(max_n + 1), s2(max_n + 1), ys(max_n + 1), xs(max_n) {}
};

// GCC: vectorise pass 1 (see the header); an AVX2 clone next to the baseline one on x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTOPD_PASS1_ATTR __attribute__((target_clones("avx2", "default"), optimize("no-trapping-math")))
#elif defined(__GNUC__) && !defined(__clang__)
#define FASTOPD_PASS1_ATTR __attribute__((optimize("no-trapping-math")))
#else
#define FASTOPD_PASS1_ATTR
#endif

// Pass 1 over tau in [m, n-m], branch-free so that the compiler vectorises it (each lane does exactly the
// scalar operations; the avx2 clone is picked at load time when the CPU has it):
//   ys[tau] = (RSS(0,tau) + RSS(tau,n))/n + eps   if mean(x[tau:]) < mean(x[:tau])  (a candidate)
// (eps = kBicEps, or 0.0 for a scaled series: then ys[tau] is q = RSS/n exactly, as q + 0.0 == q for q >= +0.0)
//   ys[tau] = NaN                                   otherwise.
// A candidate's value is never NaN: both RSS are clamped (NaN -> 0), so it lies in [eps, inf] ([0, inf) scaled).
// idx[i] = double(i); s1, s2, idx hold at least n + 1 entries.
FASTOPD_PASS1_ATTR
void candidate_y(const double* __restrict s1, const double* __restrict s2, const double* __restrict idx,
                 double* __restrict ys, int64_t m, int64_t n, double eps) {
  const double nd = idx[n];
  const double s1n = s1[n];
  const double s2n = s2[n];
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t tau = m; tau <= n - m; ++tau) {
    const double t = idx[tau];
    const double nt = nd - t;  // exact: both are integers < 2^53
    // mean(x[:tau]) and mean(x[tau:]) of the centred series, as the reference computes them.
    const double left = s1[tau] / t;
    const double right = (s1n - s1[tau]) / nt;
    // RSS(0, tau): S1[0] = S2[0] = 0, and v - 0.0 == v for every double v, so the subtraction is dropped.
    const double dl = s1[tau];
    double rl = s2[tau] - dl * dl / t;
    rl = rl > 0.0 ? rl : 0.0;  // a NaN also becomes 0, like `r if r > 0.0 else 0.0`
    // RSS(tau, n).
    const double dr = s1n - s1[tau];
    double rr = (s2n - s2[tau]) - dr * dr / nt;
    rr = rr > 0.0 ? rr : 0.0;
    const double y = (rl + rr) / nd + eps;
    ys[tau] = right < left ? y : nan;
  }
}

// ln(q 2^e2 + eps) for a scaled series' q = RSS'/n >= 0 (e2 = 2E): the log argument RSS/n + eps of the series
// as given, without forming RSS/n (it may overflow) or eps 2^-e2 (it may underflow). With a = ln(q 2^e2) and
// u = a - ln eps: ln(e^a + e^(ln eps)) = a + log1p(e^-u) if u > 0, else ln eps + log1p(e^u); q = 0 gives ln eps.
// ln 2 and ln eps are libm's log at run time (volatile: not folded by the compiler), as math.log in
// reference._log_scaled. Mirrors it operation for operation.
inline double log_scaled(double q, int e2) {
  volatile double two = 2.0, eps = kBicEps;
  const double log_eps = std::log(static_cast<double>(eps));
  if (q == 0.0) return log_eps;
  const double a = std::log(q) + static_cast<double>(e2) * std::log(static_cast<double>(two));
  const double u = a - log_eps;
  return u > 0.0 ? a + std::log1p(std::exp(-u)) : log_eps + std::log1p(std::exp(u));
}

// The exponent E by which a series is scaled (x_i 2^-E), or 0 when it is scanned as given (see kScaleLimit).
// n >= 1 and every x_i finite.
inline int scale_exponent(const double* x, int64_t n) {
  double amax = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  if (amax == 0.0) return 0;
  int e = 0;
  std::frexp(amax, &e);
  int bits = 0;
  for (uint64_t v = static_cast<uint64_t>(n); v; v >>= 1) ++bits;
  return e + bits > kScaleLimit ? e : 0;
}

// The scan of one series x[0..n), m >= 1. Mirrors fastopd.reference._scan_one operation for operation
// (plus the log skipping explained in the header, which changes no result). idx[i] = double(i), i <= n.
inline ScanResult scan_one(const double* x, int64_t n, int64_t m, double min_gain, const double* idx,
                           Scratch& sc) {
  const double inf = std::numeric_limits<double>::infinity();

  // A non-finite value anywhere: no decision (checked before the length test, like the reference).
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return {n, std::numeric_limits<double>::quiet_NaN(), false};
  }
  if (n < m || n - m < m) return {n, -inf, false};  // n < 2m, written so that 2m cannot overflow

  // Huge values: scan x 2^-e instead (exact), and take every log argument back to the series as given.
  const int e = scale_exponent(x, n);
  if (e != 0) {
    double* xs = sc.xs.data();
    for (int64_t i = 0; i < n; ++i) xs[i] = std::ldexp(x[i], -e);
    x = xs;
  }

  // Centre: sequential sum, then c = total / n.
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  const double nd = static_cast<double>(n);
  const double c = total / nd;

  // Sequential prefix sums of d = x - c and d*d.
  double* s1 = sc.s1.data();
  double* s2 = sc.s2.data();
  // (Running sums in registers: the stores to s1/s2 may alias x as far as the compiler knows.)
  double run1 = 0.0, run2 = 0.0;
  s1[0] = 0.0;
  s2[0] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - c;
    run1 = run1 + d;
    run2 = run2 + d * d;
    s1[i + 1] = run1;
    s2[i + 1] = run2;
  }

  // BIC0 from RSS(0, n).
  const double log_n = std::log(nd);
  double r0 = s2[n] - s1[n] * s1[n] / nd;
  r0 = r0 > 0.0 ? r0 : 0.0;
  const double bic0 =
      (e == 0 ? nd * std::log(r0 / nd + kBicEps) : nd * log_scaled(r0 / nd, 2 * e)) + 2.0 * log_n;
  const double four_log_n = 4.0 * log_n;

  // Pass 1: the log argument y of BIC1 for every candidate tau (NaN for the others); q = RSS/n when scaled.
  candidate_y(s1, s2, idx, sc.ys.data(), m, n, e == 0 ? kBicEps : 0.0);
  const double* ys = sc.ys.data();

  // Pass 2: y_min, the smallest y over the candidates (a NaN compares false and is skipped).
  double y_min = inf;
  bool any = false;
  for (int64_t tau = m; tau <= n - m; ++tau) {
    const double y = ys[tau];
    if (y <= y_min) {
      y_min = y;
      any = true;
    }
  }
  if (!any) return {n, -inf, false};

  // Pass 3: argmin of BIC1, the first (smallest tau) on ties, over the candidates with y <= y_min (1 + 1e-9);
  // every other candidate has a strictly larger BIC1 than y_min's (see the header), so it can be neither
  // the minimum nor tie with it. A scaled series evaluates every candidate.
  const double y_limit = e == 0 ? y_min * kSkipFactor : inf;
  int64_t best_tau = -1;
  double best_bic = inf;
  for (int64_t tau = m; tau <= n - m; ++tau) {
    const double y = ys[tau];
    if (!(y <= y_limit)) continue;  // not a candidate, or too far above the minimum
    const double bic1 = (e == 0 ? nd * std::log(y) : nd * log_scaled(y, 2 * e)) + four_log_n;
    if (best_tau < 0 || bic1 < best_bic) {
      best_tau = tau;
      best_bic = bic1;
    }
  }
  if (best_tau < 0) return {n, -inf, false};
  const double gain = bic0 - best_bic;
  const bool accepted = gain > min_gain;
  return {accepted ? best_tau : n, gain, accepted};
}

bool is_float_dtype(const py::array& a) { return a.dtype().kind() == 'f'; }
bool is_int_dtype(const py::array& a) { return a.dtype().kind() == 'i' || a.dtype().kind() == 'u'; }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

// A validated ragged batch: contiguous float64 values and int64 offsets (B+1), and the longest series.
struct Ragged {
  py::array_t<double, py::array::c_style | py::array::forcecast> values;
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets;
  int64_t batch = 0;
  int64_t max_n = 0;
  int64_t total_n = 0;
};

// Validation shared by bic_scan and online_scan (defensive: the Python wrappers have already run
// fastopd._validate.check_ragged and the option checks).
Ragged load_ragged(const py::object& values_obj, const py::object& offsets_obj, int64_t min_segments,
                   double min_gain, int num_threads) {
  if (!py::isinstance<py::array>(values_obj)) {
    throw py::type_error("values must be a 1-D float64 numpy array, got " +
                         std::string(py::str(py::type::of(values_obj).attr("__name__"))));
  }
  if (!py::isinstance<py::array>(offsets_obj)) {
    throw py::type_error("offsets must be a 1-D int64 numpy array, got " +
                         std::string(py::str(py::type::of(offsets_obj).attr("__name__"))));
  }
  const auto values_any = py::reinterpret_borrow<py::array>(values_obj);
  const auto offsets_any = py::reinterpret_borrow<py::array>(offsets_obj);
  if (values_any.ndim() != 1) {
    throw py::value_error("values must be a 1-D array of segment means, got shape " + shape_str(values_any));
  }
  if (values_any.size() > 0 && !is_float_dtype(values_any)) {
    throw py::type_error("values must be a float array (float64 expected), got dtype " +
                         std::string(py::str(values_any.dtype())));
  }
  if (offsets_any.ndim() != 1 || offsets_any.size() < 1) {
    throw py::value_error("offsets must be a 1-D array of length B+1 >= 1, got shape " + shape_str(offsets_any));
  }
  if (!is_int_dtype(offsets_any)) {
    throw py::type_error("offsets must be an integer array (int64 expected), got dtype " +
                         std::string(py::str(offsets_any.dtype())));
  }
  if (min_segments < 1) {
    throw py::value_error("min_segments must be >= 1, got " + std::to_string(min_segments));
  }
  if (std::isnan(min_gain)) throw py::value_error("min_gain must be a number, got NaN");
  if (num_threads < 0) {
    throw py::value_error("num_threads must be >= 0 (0: OpenMP's default), got " + std::to_string(num_threads));
  }
  Ragged r;
  // Contiguous float64 / int64 views (no copy when the input already is).
  r.values = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(values_any);
  r.offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(offsets_any);
  if (!r.values || !r.offsets) throw py::error_already_set();

  const int64_t len = r.values.size();
  r.batch = r.offsets.size() - 1;
  const int64_t* off = r.offsets.data();
  if (off[0] < 0 || off[r.batch] > len) {
    throw py::value_error("offsets must lie in [0, len(values)=" + std::to_string(len) + "], got first " +
                          std::to_string(off[0]) + " and last " + std::to_string(off[r.batch]));
  }
  for (int64_t b = 0; b < r.batch; ++b) {
    const int64_t n = off[b + 1] - off[b];
    if (n < 0) {
      throw py::value_error("offsets must be non-decreasing, but offsets[" + std::to_string(b + 1) +
                            "]=" + std::to_string(off[b + 1]) + " < offsets[" + std::to_string(b) +
                            "]=" + std::to_string(off[b]));
    }
    if (n > r.max_n) r.max_n = n;
  }
  r.total_n = off[r.batch] - off[0];
  return r;
}

// Runs body(b, scratch, idx) for every rollout b of the batch, the GIL released; in parallel over rollouts
// (OpenMP, dynamic chunks) when the batch is large. Scratch for every thread and the shared table
// idx[i] = double(i) are allocated before, with the GIL held (a failed allocation is a MemoryError).
template <typename Body>
void for_each_rollout(const Ragged& r, int num_threads, Body body) {
  const int64_t batch = r.batch;
  // Threads: at most one per rollout. Chunks of up to kChunk rollouts, smaller when there are few
  // rollouts (a batch of a few long rollouts still spreads over the threads).
  int64_t threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (threads > batch) threads = batch > 0 ? batch : 1;
  const bool parallel =
      threads > 1 && (batch >= kParallelMinRollouts || r.total_n >= kParallelMinValues);
  int64_t chunk = batch / (8 * threads);
  chunk = chunk < 1 ? 1 : (chunk > kChunk ? kChunk : chunk);

  std::vector<double> idx(static_cast<size_t>(r.max_n) + 1);
  for (int64_t i = 0; i <= r.max_n; ++i) idx[i] = static_cast<double>(i);
  std::vector<Scratch> scratch;
  scratch.reserve(parallel ? threads : 1);
  for (int64_t t = 0; t < (parallel ? threads : 1); ++t) scratch.emplace_back(r.max_n);

  py::gil_scoped_release nogil;
  if (!parallel) {
    Scratch& sc = scratch[0];
    for (int64_t b = 0; b < batch; ++b) body(b, sc, idx.data());
  } else {
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      Scratch& sc = scratch[omp_get_thread_num()];  // the team has at most `threads` threads
#pragma omp for schedule(dynamic, chunk)
      for (int64_t b = 0; b < batch; ++b) body(b, sc, idx.data());
    }
  }
}

py::tuple bic_scan(const py::object& values_obj, const py::object& offsets_obj, int64_t min_segments,
                   double min_gain, int num_threads) {
  const Ragged r = load_ragged(values_obj, offsets_obj, min_segments, min_gain, num_threads);
  const int64_t batch = r.batch;
  const double* x = r.values.data();
  const int64_t* off = r.offsets.data();
  const int64_t m = min_segments;

  py::array_t<int64_t> release_arr(batch);
  py::array_t<double> gain_arr(batch);
  py::array_t<bool> accepted_arr(batch);
  int64_t* release = release_arr.mutable_data();
  double* gain = gain_arr.mutable_data();
  bool* accepted = accepted_arr.mutable_data();

  for_each_rollout(r, num_threads, [&](int64_t b, Scratch& sc, const double* idx) {
    const ScanResult s = scan_one(x + off[b], off[b + 1] - off[b], m, min_gain, idx, sc);
    release[b] = s.release;
    gain[b] = s.gain;
    accepted[b] = s.accepted;
  });
  return py::make_tuple(release_arr, gain_arr, accepted_arr);
}

// ---- online release (docs/formulas.md §8): the online rule replayed on a logged series ----
//
// After each new segment n' (1 <= n' <= n), the scan of §3 on the prefix x[0..n'); stop at the first n' where it
// is accepted with release r and n' - r >= c. A prefix can only stop when n' >= m + c (r >= m), so the scans of
// shorter prefixes are skipped (they cannot stop, whatever their result), and prefixes that hold a non-finite
// value are not scanned (their scan gives NaN, never accepted). Each prefix scan is scan_one on x[0..n'), the
// very function bic_scan runs, so every decision is bit for bit fastopd.reference.online_release's (which runs
// _scan_one on every prefix). Without a stop: the scan of the whole series (bic_scan's result). O(n^2) per series
// in the worst case (each prefix re-centres its series, so its prefix sums are recomputed: see docs/formulas.md
// §8 for why this is kept exact rather than incremental); segment series are short (tens to hundreds).
struct OnlineResult {
  int64_t stop;
  ScanResult scan;
  bool stopped;
};

inline OnlineResult online_one(const double* x, int64_t n, int64_t m, int64_t c, double min_gain, const double* idx,
                               Scratch& sc) {
  // prefixes x[0..n') with n' < first_bad are finite
  int64_t first_bad = n;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) {
      first_bad = i;
      break;
    }
  }
  if (c <= n - m) {  // n' = m + c <= n, written so that m + c cannot overflow
    const int64_t last = first_bad < n ? first_bad : n;
    for (int64_t np = m + c; np <= last; ++np) {
      const ScanResult s = scan_one(x, np, m, min_gain, idx, sc);
      if (s.accepted && np - s.release >= c) return {np, s, true};
      if (np == n) return {n, s, false};  // the whole series' scan, already done
    }
  }
  return {n, scan_one(x, n, m, min_gain, idx, sc), false};
}

py::tuple online_scan(const py::object& values_obj, const py::object& offsets_obj, int64_t min_segments,
                      double min_gain, int64_t confirm_segments, int num_threads) {
  const Ragged r = load_ragged(values_obj, offsets_obj, min_segments, min_gain, num_threads);
  if (confirm_segments < min_segments) {
    throw py::value_error("confirm_segments must be >= min_segments=" + std::to_string(min_segments) + ", got " +
                          std::to_string(confirm_segments));
  }
  const int64_t batch = r.batch;
  const double* x = r.values.data();
  const int64_t* off = r.offsets.data();
  const int64_t m = min_segments;
  const int64_t c = confirm_segments;

  py::array_t<int64_t> stop_arr(batch);
  py::array_t<int64_t> release_arr(batch);
  py::array_t<double> gain_arr(batch);
  py::array_t<bool> accepted_arr(batch);
  py::array_t<bool> stopped_arr(batch);
  int64_t* stop = stop_arr.mutable_data();
  int64_t* release = release_arr.mutable_data();
  double* gain = gain_arr.mutable_data();
  bool* accepted = accepted_arr.mutable_data();
  bool* stopped = stopped_arr.mutable_data();

  for_each_rollout(r, num_threads, [&](int64_t b, Scratch& sc, const double* idx) {
    const OnlineResult o = online_one(x + off[b], off[b + 1] - off[b], m, c, min_gain, idx, sc);
    stop[b] = o.stop;
    release[b] = o.scan.release;
    gain[b] = o.scan.gain;
    accepted[b] = o.scan.accepted;
    stopped[b] = o.stopped;
  });
  return py::make_tuple(stop_arr, release_arr, gain_arr, accepted_arr, stopped_arr);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  py::options options;
  options.disable_function_signatures();  // the docstring below starts with the signature
  mod.doc() =
      "fastopd._C: the batched ragged profiled RSS-BIC scan (docs/formulas.md §3), bit for bit "
      "fastopd.reference.bic_release, and its online replay (§8), bit for bit fastopd.reference.online_release. "
      "Use fastopd.bic_release / fastopd.online_release, which validate their arguments and wrap the results "
      "in a ReleaseResult / OnlineReleaseResult.";
  mod.def("bic_scan", &bic_scan, py::arg("values"), py::arg("offsets"), py::arg("min_segments"),
          py::arg("min_gain"), py::arg("num_threads") = 0,
          R"doc(bic_scan(values, offsets, min_segments, min_gain, num_threads=0) -> (release, gain, accepted)

Profiled RSS-BIC release point of every rollout of a ragged batch (docs/formulas.md §3).

For each series x = values[offsets[b]:offsets[b+1]] of length n, with prefix sums S1, S2 of the
centred series x - sum(x)/n:
  RSS(a,b) = (S2[b]-S2[a]) - (S1[b]-S1[a])^2/(b-a), clamped at 0
  BIC0     = n ln(RSS(0,n)/n + 1e-12) + 2 ln n
  BIC1(t)  = n ln((RSS(0,t) + RSS(t,n))/n + 1e-12) + 4 ln n,  m <= t <= n-m, mean(x[t:]) < mean(x[:t])
  t* = argmin BIC1 (smallest t on ties), gain = BIC0 - BIC1(t*), accepted = gain > min_gain,
  release = t* if accepted else n.
No candidate (n < 2m or no strictly downward split): gain = -inf. A non-finite value in the series:
gain = NaN, not accepted, release = n. O(total n); the GIL is released; batches of >= 4096 rollouts
(or >= 2^18 values) run in parallel over rollouts with OpenMP.

Args:
    values: 1-D float64 array (other float dtypes are converted), the concatenated series.
    offsets: 1-D int64 array of length B+1, non-decreasing, within [0, len(values)].
    min_segments: m >= 1, the fewest segments on each side of a split.
    min_gain: acceptance threshold on the gain (not NaN; -inf accepts every candidate).
    num_threads: threads for large batches; 0 means OpenMP's default, 1 forces one thread.

Returns:
    (release int64 (B,), gain float64 (B,), accepted bool (B,)) numpy arrays.

Raises:
    TypeError: values not a float array, offsets not an integer array.
    ValueError: wrong shapes, offsets decreasing or out of range, min_segments < 1, NaN min_gain,
        num_threads < 0.
)doc");
  mod.def("online_scan", &online_scan, py::arg("values"), py::arg("offsets"), py::arg("min_segments"),
          py::arg("min_gain"), py::arg("confirm_segments"), py::arg("num_threads") = 0,
          R"doc(online_scan(values, offsets, min_segments, min_gain, confirm_segments, num_threads=0) -> (stop, release, gain, accepted, stopped)

The online release rule (docs/formulas.md §8) replayed on every rollout of a ragged batch of segment means.

For each series x = values[offsets[b]:offsets[b+1]] of length n and each prefix length n' = 1..n, the scan of
bic_scan on x[:n']; the rollout stops at the first n' whose scan is accepted with release r and n' - r >= c
(c = confirm_segments >= min_segments): stop = n', (release, gain, accepted) that prefix's scan, stopped = True.
Otherwise stop = n and (release, gain, accepted) are bic_scan's on the whole series. Bit for bit
fastopd.reference.online_release. O(n^2) per series at worst; GIL released; parallel like bic_scan.

Args:
    values, offsets, min_segments, min_gain, num_threads: as in bic_scan.
    confirm_segments: c >= min_segments, the fewest segments from the release index to the stop.

Returns:
    (stop int64 (B,), release int64 (B,), gain float64 (B,), accepted bool (B,), stopped bool (B,)).

Raises:
    TypeError, ValueError: as bic_scan; confirm_segments < min_segments.
)doc");
}
