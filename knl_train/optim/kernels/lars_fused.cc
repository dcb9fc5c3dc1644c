// The LARS update of knl_train/optim/lars.py as CPU kernels: KnlLarsApply for one variable,
// KnlLarsApplyMulti for a whole step's variables of one dtype.
//
//   KnlLarsApply(var, accum: resource, lr, momentum: double, grad: T, weight_decay,
//                trust_coefficient, epsilon: double; T, lars_variant, nesterov, adapt)
//     -> trust_ratio: T (the t applied, for lars.py's trust_ratio slot, which has type T)
//
//   KnlLarsApplyMulti(vars, accums: N * resource, trust_ratio_slots: M * resource,
//                     grads: N * T, lr, momentum, weight_decay, trust_coefficient,
//                     epsilon: double; T, N, M, lars_variant, nesterov,
//                     adapt, use_weight_decay: list(bool) of N)
//     -> trust_ratios: T[N] (and each adapted variable's t written to its slot)
//
// lars.py's pure-TF path spends 7-12 memory passes per variable (two norms, g + βw
// materialised, then TF's momentum kernel); these kernels spend seven, against plain
// momentum SGD's five:
//
//   pass 1 (only for adapted variables): read w and g once, accumulating Σw² and Σd², where
//           d = g (you, tf_contrib) or d = g + βw (model_garden);
//   pass 2: read w, g, v; write w and v.
//
// The multi op runs each pass once over all its variables: a model of many small variables
// pays one op launch, one lock round and two thread-pool dispatches per step, not N of each
// plus N slot assignments. Both ops run the same functions (ComputeTrustRatios, ApplyUpdates),
// so a variable gets the same bits from either.
//
// The formulas and the sign conventions of the momentum slot are exactly lars.py's:
//
//   you           t = η‖w‖ / (‖g‖ + β‖w‖ + ε);  u ← m·u − lr·t·(g + βw);  w ← w + u
//   model_garden  t = η‖w‖ / (‖g + βw‖ + ε);      u ← m·u − lr·t·(g + βw);  w ← w + u
//   tf_contrib    t = η‖w‖ / (‖g‖ + β‖w‖ + ε);  v ← m·v + g;             w ← w − lr·t·v
//
// u = −v is Keras' momentum slot (ResourceApplyKerasMomentum), tf_contrib keeps +v as TF's
// ApplyMomentum does; nesterov as in those two kernels. t = 1 when ‖w‖ = 0, when the
// denominator without ε is 0 (or NaN), or when the variable is not adapted (attr adapt).
//
// Determinism. Data-parallel ranks must stay bit-identical, so the norms cannot depend on
// thread scheduling: each variable is cut into fixed blocks of kBlock elements, each block
// sums into kLanes independent double accumulators (element i of a block goes to lane
// i % kLanes, written as explicit vectors), the lanes are added in a fixed tree, and the
// block sums are added in block order. Which thread runs which block (of which variable)
// does not matter, nor which other variables share the call. The build uses
// -ffp-contract=off and no -ffast-math, so the compiler can neither reorder the sums nor
// fuse a multiply-add: the same inputs give the same bits whatever the thread count, and
// whatever instruction set the kernel was compiled for.
//
// Precision. Norms accumulate in double for every type. The update runs in the variable's
// type, except bfloat16, which loads into float, computes in float and rounds once per
// stored value (round to nearest even, as Eigen does).
//
// Scalars (lr, momentum, weight_decay, trust_coefficient, epsilon) are double tensors, not
// float attrs: TF's float attrs hold 32 bits, and a rounded β or η would break parity with
// the pure-TF path on float64 variables. lr and momentum change per step anyway.

// The variable-copy helpers of training_op_helpers.h run Eigen expressions on the CPU
// device, which needs Eigen's thread-pool executor.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

namespace knl_train {
namespace {

namespace tf = ::tensorflow;
using CPUDevice = Eigen::ThreadPoolDevice;

// Unit of both work sharding and the norm reduction (64 KiB of float32 per operand).
constexpr int64_t kBlock = int64_t{1} << 14;
// Independent accumulators per block; a multiple of every vector width we compile for.
constexpr int kLanes = 16;
// ParallelFor cost estimates, in cycles per element (memory-bound).
constexpr int64_t kSumCyclesPerElement = 1;
constexpr int64_t kUpdateCyclesPerElement = 2;

enum class Variant { kYou, kTfContrib, kModelGarden };

// Four-element vectors (GCC/Clang vector extensions): per-lane IEEE arithmetic on whatever
// registers the target has. The norm accumulators are kLanes / 4 of them, named in the
// source, so the lanes, and with them the rounding, are fixed by this file, not by the
// compiler's vectoriser or the ISA.
typedef double Double4 __attribute__((vector_size(4 * sizeof(double))));
typedef float Float4 __attribute__((vector_size(4 * sizeof(float))));
typedef uint32_t U32x4 __attribute__((vector_size(4 * sizeof(uint32_t))));
typedef uint16_t U16x4 __attribute__((vector_size(4 * sizeof(uint16_t))));

// Exact, so an ISA-specific instruction cannot change a result; GCC 12 lowers the generic
// conversion through the stack, hence the AVX form where available.
inline Double4 ToDouble(Float4 x) {
#if defined(__AVX__)
  return reinterpret_cast<Double4>(_mm256_cvtps_pd(reinterpret_cast<__m128>(x)));
#else
  return __builtin_convertvector(x, Double4);
#endif
}
inline Double4 ToDouble(Double4 x) { return x; }

// Storage type ↔ arithmetic type. bfloat16 is handled as raw bits so that the conversions
// are plain integer shifts the compiler can vectorise.
template <typename T>
struct Elem;

// float and double are stored as they are computed.
template <typename T, typename Vec4>
struct PlainElem {
  using Storage = T;
  using Compute = T;
  static T Load(T x) { return x; }
  static T Store(T x) { return x; }
  static Vec4 Load4(const T* p) {
    Vec4 x;
    std::memcpy(&x, p, sizeof x);
    return x;
  }
};

template <>
struct Elem<float> : PlainElem<float, Float4> {};

template <>
struct Elem<double> : PlainElem<double, Double4> {};

template <>
struct Elem<tf::bfloat16> {
  using Storage = uint16_t;
  using Compute = float;
  static float Load(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static uint16_t Store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // nearest, ties even
    const uint32_t quiet_nan = ((bits >> 16) & 0x8000u) | 0x7fc0u;          // Eigen's NaN
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
  static Float4 Load4(const uint16_t* p) {
    U16x4 h;
    std::memcpy(&h, p, sizeof h);
    const U32x4 bits = __builtin_convertvector(h, U32x4) << 16;
    Float4 x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
  }
};

template <typename T>
const typename Elem<T>::Storage* Data(const tf::Tensor& t) {
  return reinterpret_cast<const typename Elem<T>::Storage*>(t.flat<T>().data());
}
template <typename T>
typename Elem<T>::Storage* MutableData(tf::Tensor* t) {
  return reinterpret_cast<typename Elem<T>::Storage*>(t->flat<T>().data());
}

// Σw² and Σd² over elements [begin, end), d = g + βw if kDecayedNorm else g. Element
// begin + i goes to lane i % 16 (lane 4q + r is element r of accumulator q); d is formed in
// the update's precision (as the pure-TF path forms g + βw in the variable's dtype), then
// squared and summed in double. The lanes are added in a fixed tree at the end.
template <typename T, bool kDecayedNorm>
void BlockSums(const typename Elem<T>::Storage* w, const typename Elem<T>::Storage* g,
               int64_t begin, int64_t end, typename Elem<T>::Compute beta, double* sum_ww,
               double* sum_dd) {
  static_assert(kLanes == 16, "BlockSums names four accumulators of four lanes");
  using E = Elem<T>;
  using Storage = typename E::Storage;
  Double4 w0 = {}, w1 = {}, w2 = {}, w3 = {}, d0 = {}, d1 = {}, d2 = {}, d3 = {};
  auto add4 = [beta](const Storage* wp, const Storage* gp, Double4& aw, Double4& ad) {
    const auto wl = E::Load4(wp);
    auto dl = E::Load4(gp);
    if (kDecayedNorm) dl = dl + beta * wl;
    const Double4 wd = ToDouble(wl), dd = ToDouble(dl);
    aw = aw + wd * wd;
    ad = ad + dd * dd;
  };
  auto add16 = [&](const Storage* wp, const Storage* gp) {
    add4(wp, gp, w0, d0);
    add4(wp + 4, gp + 4, w1, d1);
    add4(wp + 8, gp + 8, w2, d2);
    add4(wp + 12, gp + 12, w3, d3);
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) add16(w + i, g + i);
  if (i < end) {
    // The ragged tail, zero-padded: the padding adds +0 to non-negative sums, a no-op.
    Storage wt[kLanes] = {}, gt[kLanes] = {};
    std::copy(w + i, w + end, wt);
    std::copy(g + i, g + end, gt);
    add16(wt, gt);
  }
  auto total = [](Double4 a, Double4 b, Double4 c, Double4 d) {
    const Double4 s = (a + c) + (b + d);  // lane r: (q0 + q2) + (q1 + q3)
    return (s[0] + s[2]) + (s[1] + s[3]);
  };
  *sum_ww = total(w0, w1, w2, w3);
  *sum_dd = total(d0, d1, d2, d3);
}

// The momentum step over elements [begin, end); s = lr·t. Operation order follows TF's
// ApplyKerasMomentum / ApplyMomentum functors, so float32 results stay within an ulp or two.
template <typename T, Variant kVariant, bool kNesterov, bool kDecay>
void BlockUpdate(typename Elem<T>::Storage* __restrict w, typename Elem<T>::Storage* __restrict v,
                 const typename Elem<T>::Storage* __restrict g, int64_t begin, int64_t end,
                 typename Elem<T>::Compute s, typename Elem<T>::Compute m,
                 typename Elem<T>::Compute beta) {
  using E = Elem<T>;
  using C = typename E::Compute;
  for (int64_t i = begin; i < end; ++i) {
    const C wi = E::Load(w[i]), gi = E::Load(g[i]), vi = E::Load(v[i]);
    if (kVariant == Variant::kTfContrib) {
      // v ← m·v + g (raw gradient; β only shrank t);  w ← w − s·v
      const C vn = vi * m + gi;
      v[i] = E::Store(vn);
      w[i] = E::Store(kNesterov ? C(wi - (gi * s + vn * m * s)) : C(wi - vn * s));
    } else {
      // Keras keeps u = −v:  u ← m·u − s·(g + βw);  w ← w + u
      const C gd = kDecay ? C(gi + beta * wi) : gi;
      const C un = vi * m - gd * s;
      v[i] = E::Store(un);
      w[i] = E::Store(kNesterov ? C(wi + (un * m - gd * s)) : C(wi + un));
    }
  }
}

template <typename T>
using UpdateFn = void (*)(typename Elem<T>::Storage*, typename Elem<T>::Storage*,
                          const typename Elem<T>::Storage*, int64_t, int64_t,
                          typename Elem<T>::Compute, typename Elem<T>::Compute,
                          typename Elem<T>::Compute);

template <typename T, Variant kVariant>
UpdateFn<T> PickUpdate(bool nesterov, bool decay) {
  if (nesterov) {
    return decay ? BlockUpdate<T, kVariant, true, true> : BlockUpdate<T, kVariant, true, false>;
  }
  return decay ? BlockUpdate<T, kVariant, false, true> : BlockUpdate<T, kVariant, false, false>;
}

template <typename T>
UpdateFn<T> PickUpdate(Variant variant, bool nesterov, bool decay) {
  switch (variant) {
    case Variant::kYou:
      return PickUpdate<T, Variant::kYou>(nesterov, decay);
    case Variant::kModelGarden:
      return PickUpdate<T, Variant::kModelGarden>(nesterov, decay);
    case Variant::kTfContrib:
      break;
  }
  // β never enters tf_contrib's update.
  return PickUpdate<T, Variant::kTfContrib>(nesterov, false);
}

// ---- One LARS step over any number of variables ------------------------------------------------
//
// Both ops run the code below: KnlLarsApply on one variable, KnlLarsApplyMulti on many, so a
// variable's bits cannot depend on which op updated it, nor on its neighbours in a call.

// One variable's part of a step.
template <typename T>
struct VarStep {
  using Storage = typename Elem<T>::Storage;
  Storage* w = nullptr;
  Storage* v = nullptr;
  const Storage* g = nullptr;
  int64_t n = 0;
  double beta = 0.0;  // β, or 0 for a variable excluded from weight decay
  bool adapt = true;
  double t = 1.0;     // the trust ratio, once pass 1 has run
};

// A (variable, block) pair: the unit of sharding in both passes. A variable's units are
// consecutive and in block order.
struct Unit {
  int64_t step;
  int64_t begin;
};

template <typename T>
std::vector<Unit> MakeUnits(const std::vector<VarStep<T>>& steps, bool adapted_only,
                            int64_t* elements) {
  std::vector<Unit> units;
  *elements = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(steps.size()); ++i) {
    if (adapted_only && !steps[i].adapt) continue;
    for (int64_t begin = 0; begin < steps[i].n; begin += kBlock) units.push_back({i, begin});
    *elements += steps[i].n;
  }
  return units;
}

// ParallelFor's cost of one unit, in cycles: the mean over the units, so that a call of many
// small variables is not sharded as if each were a full block.
inline int64_t UnitCost(int64_t elements, size_t units, int64_t cycles_per_element) {
  return std::max<int64_t>(1, cycles_per_element * elements / static_cast<int64_t>(units));
}

double TrustRatio(Variant variant, double sum_ww, double sum_dd, double beta, double eta,
                  double eps) {
  const double w_norm = std::sqrt(sum_ww);
  const double denom =
      variant == Variant::kModelGarden ? std::sqrt(sum_dd) : std::sqrt(sum_dd) + beta * w_norm;
  return (w_norm > 0.0 && denom > 0.0) ? eta * w_norm / (denom + eps) : 1.0;
}

// Pass 1: every adapted variable's block sums, sharded over all blocks of all variables, then
// each variable's sums added in block order (see the header); sets each step's t.
template <typename T>
void ComputeTrustRatios(std::vector<VarStep<T>>* steps, Variant variant, double eta, double eps,
                        tf::thread::ThreadPool* pool) {
  using C = typename Elem<T>::Compute;
  int64_t elements = 0;
  const std::vector<Unit> units = MakeUnits(*steps, /*adapted_only=*/true, &elements);
  if (units.empty()) return;
  std::vector<double> partial(2 * units.size());
  pool->ParallelFor(units.size(), UnitCost(elements, units.size(), kSumCyclesPerElement),
                    [&](int64_t u0, int64_t u1) {
                      for (int64_t u = u0; u < u1; ++u) {
                        const VarStep<T>& s = (*steps)[units[u].step];
                        const bool decayed = variant == Variant::kModelGarden && s.beta != 0.0;
                        const auto sums = decayed ? BlockSums<T, true> : BlockSums<T, false>;
                        sums(s.w, s.g, units[u].begin, std::min(s.n, units[u].begin + kBlock),
                             static_cast<C>(s.beta), &partial[2 * u], &partial[2 * u + 1]);
                      }
                    });
  for (size_t u = 0; u < units.size();) {
    const int64_t i = units[u].step;
    double ww = 0.0, dd = 0.0;
    for (; u < units.size() && units[u].step == i; ++u) {
      ww += partial[2 * u];
      dd += partial[2 * u + 1];
    }
    VarStep<T>& s = (*steps)[i];
    s.t = TrustRatio(variant, ww, dd, s.beta, eta, eps);
  }
}

// Pass 2: every variable's update with its t, element-wise, so any sharding gives the same bits.
template <typename T>
void ApplyUpdates(const std::vector<VarStep<T>>& steps, Variant variant, bool nesterov, double lr,
                  double momentum, tf::thread::ThreadPool* pool) {
  using C = typename Elem<T>::Compute;
  int64_t elements = 0;
  const std::vector<Unit> units = MakeUnits(steps, /*adapted_only=*/false, &elements);
  if (units.empty()) return;
  std::vector<UpdateFn<T>> update(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    update[i] = PickUpdate<T>(variant, nesterov, steps[i].beta != 0.0);
  }
  const C m = static_cast<C>(momentum);
  pool->ParallelFor(units.size(), UnitCost(elements, units.size(), kUpdateCyclesPerElement),
                    [&](int64_t u0, int64_t u1) {
                      for (int64_t u = u0; u < u1; ++u) {
                        const VarStep<T>& s = steps[units[u].step];
                        update[units[u].step](s.w, s.v, s.g, units[u].begin,
                                              std::min(s.n, units[u].begin + kBlock),
                                              static_cast<C>(lr * s.t), m,
                                              static_cast<C>(s.beta));
                      }
                    });
}

// ---- Kernel plumbing shared by both ops -----------------------------------------------------

struct Hyper {
  double lr, momentum, weight_decay, trust_coefficient, epsilon;
};

tf::Status ReadHyper(tf::OpKernelContext* ctx, const char* op, Hyper* h) {
  for (const auto& [name, out] : {std::pair<const char*, double*>{"lr", &h->lr},
                                  {"momentum", &h->momentum},
                                  {"weight_decay", &h->weight_decay},
                                  {"trust_coefficient", &h->trust_coefficient},
                                  {"epsilon", &h->epsilon}}) {
    const tf::Tensor* t = nullptr;
    TF_RETURN_IF_ERROR(ctx->input(name, &t));
    if (!tf::TensorShapeUtils::IsScalar(t->shape())) {
      return tf::errors::InvalidArgument(op, ": ", name, " must be a scalar, got ",
                                         t->shape().DebugString());
    }
    *out = t->scalar<double>()();
  }
  return tf::OkStatus();
}

tf::Status ParseVariant(tf::OpKernelConstruction* ctx, Variant* out) {
  std::string variant;
  TF_RETURN_IF_ERROR(ctx->GetAttr("lars_variant", &variant));
  *out = variant == "you"          ? Variant::kYou
         : variant == "tf_contrib" ? Variant::kTfContrib
                                   : Variant::kModelGarden;  // the attr enum admits no other
  return tf::OkStatus();
}

// A resource input: its index among the op's inputs and, for messages, its argument's name
// and its position in a list argument (-1 for a single one).
struct Arg {
  int input;
  const char* name;
  int index;
};

std::string Label(const Arg& arg) {
  return arg.index < 0 ? std::string(arg.name) : tf::strings::StrCat(arg.name, "[", arg.index, "]");
}

// The variables an op writes: each looked up once (a call of many small variables is mostly
// this bookkeeping), checked to be distinct (an op writing one variable through two inputs
// would lose a write), and locked exclusively in the address order of their mutexes, as
// TF's ResourceApply* kernels lock theirs, so ops sharing variables cannot deadlock. The locks
// are released, then the references dropped, on destruction.
class LockedVariables {
 public:
  tf::Status Acquire(tf::OpKernelContext* ctx, const char* op, std::vector<Arg> args) {
    args_ = std::move(args);
    vars_.resize(args_.size());
    std::vector<std::pair<tf::mutex*, size_t>> order;
    order.reserve(args_.size());
    for (size_t k = 0; k < args_.size(); ++k) {
      TF_RETURN_IF_ERROR(
          tf::LookupResource(ctx, tf::HandleFromInput(ctx, args_[k].input), &vars_[k]));
      order.emplace_back(vars_[k]->mu(), k);
    }
    std::sort(order.begin(), order.end());
    for (size_t k = 1; k < order.size(); ++k) {
      if (order[k].first == order[k - 1].first) {
        const Arg& a = args_[std::min(order[k - 1].second, order[k].second)];
        const Arg& b = args_[std::max(order[k - 1].second, order[k].second)];
        return tf::errors::InvalidArgument(op, ": ", Label(a), " and ", Label(b),
                                           " are one variable (",
                                           tf::HandleFromInput(ctx, a.input).name(), ")");
      }
    }
    locks_.reserve(order.size());
    for (const auto& entry : order) locks_.emplace_back(*entry.first);
    return tf::OkStatus();
  }

  // Variable k's tensor, ready to be written in place: as in TF's dense ResourceApply*
  // kernels, a buffer still referenced by a reader (or in copy-on-read mode) is copied first.
  template <typename T>
  tf::Status Writable(tf::OpKernelContext* ctx, const char* op, size_t k, tf::Tensor* out) {
    tf::Var* var = vars_[k].get();
    if (!var->tensor()->IsInitialized()) {
      return tf::errors::FailedPrecondition(op, ": ", Label(args_[k]),
                                            " is an uninitialized variable (",
                                            tf::HandleFromInput(ctx, args_[k].input).name(), ")");
    }
    const tf::DataType dtype = tf::DataTypeToEnum<T>::value;
    if (var->tensor()->dtype() != dtype) {
      return tf::errors::InvalidArgument(op, ": variable dtype ",
                                         tf::DataTypeString(var->tensor()->dtype()), " of ",
                                         Label(args_[k]), " differs from T=",
                                         tf::DataTypeString(dtype));
    }
    TF_RETURN_IF_ERROR(tf::PrepareToUpdateVariable<CPUDevice, T>(
        ctx, var->tensor(), var->copy_on_read_mode.load()));
    *out = *var->tensor();
    return tf::OkStatus();
  }

  const Arg& arg(size_t k) const { return args_[k]; }

 private:
  std::vector<Arg> args_;
  std::vector<tf::core::RefCountPtr<tf::Var>> vars_;
  std::vector<tf::mutex_lock> locks_;  // after vars_: destroyed first
};

// One variable's step from its locked variable (k) and momentum slot (k + 1) and gradient.
template <typename T>
tf::Status MakeStep(tf::OpKernelContext* ctx, const char* op, LockedVariables* vars, size_t k,
                    const tf::Tensor& grad, double beta, bool adapt, tf::Tensor* var,
                    tf::Tensor* accum, VarStep<T>* step) {
  TF_RETURN_IF_ERROR(vars->Writable<T>(ctx, op, k, var));
  TF_RETURN_IF_ERROR(vars->Writable<T>(ctx, op, k + 1, accum));
  if (!var->shape().IsSameSize(accum->shape()) || !var->shape().IsSameSize(grad.shape())) {
    return tf::errors::InvalidArgument(op, ": ", Label(vars->arg(k)), ", ",
                                       Label(vars->arg(k + 1)),
                                       " and its grad must have one shape, got ",
                                       var->shape().DebugString(), ", ",
                                       accum->shape().DebugString(), ", ",
                                       grad.shape().DebugString());
  }
  step->w = MutableData<T>(var);
  step->v = MutableData<T>(accum);
  step->g = Data<T>(grad);
  step->n = var->NumElements();
  step->beta = beta;
  step->adapt = adapt;
  return tf::OkStatus();
}

tf::thread::ThreadPool* Pool(tf::OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers;
}

// ---- KnlLarsApply: one variable --------------------------------------------------------------

template <typename T>
class KnlLarsApplyOp : public tf::OpKernel {
 public:
  explicit KnlLarsApplyOp(tf::OpKernelConstruction* ctx) : tf::OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseVariant(ctx, &variant_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("adapt", &adapt_));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    static constexpr char kOp[] = "KnlLarsApply";
    LockedVariables vars;
    OP_REQUIRES_OK(ctx, vars.Acquire(ctx, kOp, {{0, "var", -1}, {1, "accum", -1}}));
    Hyper h;
    OP_REQUIRES_OK(ctx, ReadHyper(ctx, kOp, &h));
    tf::Tensor var, accum;
    std::vector<VarStep<T>> steps(1);
    OP_REQUIRES_OK(ctx, MakeStep<T>(ctx, kOp, &vars, 0, ctx->input(4), h.weight_decay, adapt_,
                                    &var, &accum, &steps[0]));
    ComputeTrustRatios<T>(&steps, variant_, h.trust_coefficient, h.epsilon, Pool(ctx));
    tf::Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({}), &out));
    out->scalar<T>()() = static_cast<T>(steps[0].t);
    ApplyUpdates<T>(steps, variant_, nesterov_, h.lr, h.momentum, Pool(ctx));
  }

 private:
  Variant variant_ = Variant::kYou;
  bool nesterov_ = false;
  bool adapt_ = true;
};

// ---- KnlLarsApplyMulti: N variables of one dtype, two passes in all --------------------------

template <typename T>
class KnlLarsApplyMultiOp : public tf::OpKernel {
 public:
  explicit KnlLarsApplyMultiOp(tf::OpKernelConstruction* ctx) : tf::OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseVariant(ctx, &variant_));
    int n = 0, m = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &n));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("M", &m));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("adapt", &adapt_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_weight_decay", &decay_));
    OP_REQUIRES(ctx, static_cast<int>(adapt_.size()) == n && static_cast<int>(decay_.size()) == n,
                tf::errors::InvalidArgument(
                    "KnlLarsApplyMulti: adapt and use_weight_decay need one entry per variable (",
                    n, "), got ", adapt_.size(), " and ", decay_.size()));
    OP_REQUIRES(ctx, std::count(adapt_.begin(), adapt_.end(), true) == m,
                tf::errors::InvalidArgument(
                    "KnlLarsApplyMulti: one trust_ratio_slots entry per adapted variable: ",
                    std::count(adapt_.begin(), adapt_.end(), true), " adapted, ", m, " slots"));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    static constexpr char kOp[] = "KnlLarsApplyMulti";
    // The variables as LockedVariables holds them: var i at 2i, its momentum slot at 2i + 1,
    // then the trust-ratio slots.
    int vars0 = 0, accums0 = 0, slots0 = 0, stop = 0;
    OP_REQUIRES_OK(ctx, InputRange("vars", &vars0, &stop));
    const int n = stop - vars0;
    OP_REQUIRES_OK(ctx, InputRange("accums", &accums0, &stop));
    OP_REQUIRES_OK(ctx, InputRange("trust_ratio_slots", &slots0, &stop));
    const int m = stop - slots0;
    std::vector<Arg> args;
    args.reserve(2 * n + m);
    for (int i = 0; i < n; ++i) {
      args.push_back({vars0 + i, "vars", i});
      args.push_back({accums0 + i, "accums", i});
    }
    for (int k = 0; k < m; ++k) args.push_back({slots0 + k, "trust_ratio_slots", k});
    LockedVariables vars;
    OP_REQUIRES_OK(ctx, vars.Acquire(ctx, kOp, std::move(args)));
    Hyper h;
    OP_REQUIRES_OK(ctx, ReadHyper(ctx, kOp, &h));
    tf::OpInputList grads;
    OP_REQUIRES_OK(ctx, ctx->input_list("grads", &grads));

    // Every check before any write: a bad input leaves every variable as it was.
    std::vector<tf::Tensor> held(2 * n + m);  // keeps the buffers alive
    std::vector<VarStep<T>> steps(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, MakeStep<T>(ctx, kOp, &vars, 2 * i, grads[i],
                                      decay_[i] ? h.weight_decay : 0.0, adapt_[i], &held[2 * i],
                                      &held[2 * i + 1], &steps[i]));
    }
    for (int k = 0; k < m; ++k) {
      tf::Tensor& slot = held[2 * n + k];
      OP_REQUIRES_OK(ctx, vars.Writable<T>(ctx, kOp, 2 * n + k, &slot));
      OP_REQUIRES(ctx, tf::TensorShapeUtils::IsScalar(slot.shape()),
                  tf::errors::InvalidArgument(kOp, ": ", Label(vars.arg(2 * n + k)),
                                              " must be a scalar, got ",
                                              slot.shape().DebugString()));
    }

    ComputeTrustRatios<T>(&steps, variant_, h.trust_coefficient, h.epsilon, Pool(ctx));
    tf::Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({n}), &out));
    auto ratios = out->vec<T>();
    for (int i = 0, k = 0; i < n; ++i) {
      ratios(i) = static_cast<T>(steps[i].t);
      if (adapt_[i]) held[2 * n + k++].scalar<T>()() = ratios(i);
    }
    ApplyUpdates<T>(steps, variant_, nesterov_, h.lr, h.momentum, Pool(ctx));
  }

 private:
  Variant variant_ = Variant::kYou;
  bool nesterov_ = false;
  std::vector<bool> adapt_, decay_;
};

// ---- Shapes and registration ------------------------------------------------------------------

// The variable and slot shapes, where the resource handle carries one, must match ``shape``.
tf::Status MergeHandleShape(tf::shape_inference::InferenceContext* c, int input,
                            tf::shape_inference::ShapeHandle* shape) {
  const auto* handle = c->input_handle_shapes_and_types(input);
  if (handle != nullptr && handle->size() == 1) {
    TF_RETURN_IF_ERROR(c->Merge(*shape, (*handle)[0].shape, shape));
  }
  return tf::OkStatus();
}

tf::Status ScalarInputs(tf::shape_inference::InferenceContext* c) {
  for (const char* name : {"lr", "momentum", "weight_decay", "trust_coefficient", "epsilon"}) {
    std::vector<tf::shape_inference::ShapeHandle> shapes;
    TF_RETURN_IF_ERROR(c->input(name, &shapes));
    tf::shape_inference::ShapeHandle unused;
    TF_RETURN_IF_ERROR(c->WithRank(shapes[0], 0, &unused));
  }
  return tf::OkStatus();
}

tf::Status ShapeFn(tf::shape_inference::InferenceContext* c) {
  TF_RETURN_IF_ERROR(ScalarInputs(c));
  tf::shape_inference::ShapeHandle shape = c->input(4);
  for (int i : {0, 1}) TF_RETURN_IF_ERROR(MergeHandleShape(c, i, &shape));
  c->set_output(0, c->Scalar());
  return tf::OkStatus();
}

tf::Status MultiShapeFn(tf::shape_inference::InferenceContext* c) {
  TF_RETURN_IF_ERROR(ScalarInputs(c));
  int n = 0, m = 0;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  TF_RETURN_IF_ERROR(c->GetAttr("M", &m));
  // Inputs in order: vars[N], accums[N], trust_ratio_slots[M], grads[N], then the scalars.
  for (int i = 0; i < n; ++i) {
    tf::shape_inference::ShapeHandle shape = c->input(2 * n + m + i);
    TF_RETURN_IF_ERROR(MergeHandleShape(c, i, &shape));
    TF_RETURN_IF_ERROR(MergeHandleShape(c, n + i, &shape));
  }
  for (int k = 0; k < m; ++k) {
    tf::shape_inference::ShapeHandle scalar = c->Scalar();
    TF_RETURN_IF_ERROR(MergeHandleShape(c, 2 * n + k, &scalar));
  }
  c->set_output(0, c->Vector(n));
  return tf::OkStatus();
}

}  // namespace
}  // namespace knl_train

// Stateful: they write their resource inputs, so graph optimisers must neither merge two calls
// nor drop one whose output is unused. (The attr is lars_variant because TF reserves
// "variant" as a dtype name.)
REGISTER_OP("KnlLarsApply")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("lr: double")
    .Input("momentum: double")
    .Input("grad: T")
    .Input("weight_decay: double")
    .Input("trust_coefficient: double")
    .Input("epsilon: double")
    .Output("trust_ratio: T")
    .Attr("T: {float, double, bfloat16}")
    .Attr("lars_variant: {'you', 'tf_contrib', 'model_garden'}")
    .Attr("nesterov: bool = false")
    .Attr("adapt: bool = true")
    .SetIsStateful()
    .SetShapeFn(knl_train::ShapeFn);

// weight_decay is β for the variables whose use_weight_decay entry is true, 0 for the others
// (as KnlLarsApply with weight_decay 0); trust_ratio_slots are the adapted variables' scalar
// slots, in order, which receive their t (an excluded variable's t is 1 and its slot untouched).
REGISTER_OP("KnlLarsApplyMulti")
    .Input("vars: N * resource")
    .Input("accums: N * resource")
    .Input("trust_ratio_slots: M * resource")
    .Input("grads: N * T")
    .Input("lr: double")
    .Input("momentum: double")
    .Input("weight_decay: double")
    .Input("trust_coefficient: double")
    .Input("epsilon: double")
    .Output("trust_ratios: T")
    .Attr("T: {float, double, bfloat16}")
    .Attr("N: int >= 1")
    .Attr("M: int >= 0")
    .Attr("lars_variant: {'you', 'tf_contrib', 'model_garden'}")
    .Attr("nesterov: bool = false")
    .Attr("adapt: list(bool)")
    .Attr("use_weight_decay: list(bool)")
    .SetIsStateful()
    .SetShapeFn(knl_train::MultiShapeFn);

#define KNL_REGISTER_LARS_KERNELS(T)                                                        \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KnlLarsApply").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),       \
      knl_train::KnlLarsApplyOp<T>);                                                        \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("KnlLarsApplyMulti").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),  \
      knl_train::KnlLarsApplyMultiOp<T>)
KNL_REGISTER_LARS_KERNELS(float);
KNL_REGISTER_LARS_KERNELS(double);
KNL_REGISTER_LARS_KERNELS(::tensorflow::bfloat16);
#undef KNL_REGISTER_LARS_KERNELS
