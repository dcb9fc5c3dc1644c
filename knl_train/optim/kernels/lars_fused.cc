// KnlLarsApply: the LARS update of knl_train/optim/lars.py as one CPU kernel per variable.
//
//   KnlLarsApply(var, accum: resource, lr, momentum: double, grad: T, weight_decay,
//                trust_coefficient, epsilon: double; T, lars_variant, nesterov, adapt)
//     -> trust_ratio: T (the t applied, for lars.py's trust_ratio slot, which has type T)
//
// lars.py's pure-TF path spends 7-12 memory passes per variable (two norms, g + βw
// materialised, then TF's momentum kernel); this kernel spends seven, against plain
// momentum SGD's five:
//
//   pass 1 (only when the variable is adapted): read w and g once, accumulating Σw² and
//           Σd², where d = g (you, tf_contrib) or d = g + βw (model_garden);
//   pass 2: read w, g, v; write w and v.
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
// thread scheduling: the variable is cut into fixed blocks of kBlock elements, each block
// sums into kLanes independent double accumulators (element i of a block goes to lane
// i % kLanes, written as explicit vectors), the lanes are added in a fixed tree, and the
// block sums are added in block order. Which thread runs which block does not matter. The
// build uses -ffp-contract=off and no -ffast-math, so the compiler can neither reorder the
// sums nor fuse a multiply-add: the same inputs give the same bits whatever the thread
// count, and whatever instruction set the kernel was compiled for.
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
// ParallelFor cost estimates, in cycles per block (memory-bound, ~1-2 cycles an element).
constexpr int64_t kSumCostPerBlock = kBlock;
constexpr int64_t kUpdateCostPerBlock = 2 * kBlock;

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

template <typename T>
class KnlLarsApplyOp : public tf::OpKernel {
 public:
  explicit KnlLarsApplyOp(tf::OpKernelConstruction* ctx) : tf::OpKernel(ctx) {
    std::string variant;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("lars_variant", &variant));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("adapt", &adapt_));
    if (variant == "you") {
      variant_ = Variant::kYou;
    } else if (variant == "tf_contrib") {
      variant_ = Variant::kTfContrib;
    } else {  // the op's attr enum admits nothing else
      variant_ = Variant::kModelGarden;
    }
  }

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::ResourceHandle& var_handle = tf::HandleFromInput(ctx, 0);
    const tf::ResourceHandle& accum_handle = tf::HandleFromInput(ctx, 1);
    OP_REQUIRES(ctx,
                var_handle.name() != accum_handle.name() ||
                    var_handle.container() != accum_handle.container() ||
                    var_handle.device() != accum_handle.device(),
                tf::errors::InvalidArgument("KnlLarsApply: var and accum are one variable (",
                                            var_handle.name(), ")"));
    // As TF's dense ResourceApply* kernels: both variables locked exclusively (in address
    // order, so two ops sharing a variable cannot deadlock), and a variable buffer still
    // referenced by a reader (or in copy-on-read mode) is copied before we write into it.
    auto locks = tf::MaybeLockVariableInputMutexesInOrder<CPUDevice, T>(
        ctx, /*do_lock=*/true, /*sparse=*/false, {0, 1});
    tf::Tensor var, accum;
    OP_REQUIRES_OK(ctx, tf::GetInputTensorFromVariable<CPUDevice, T>(
                            ctx, 0, /*lock_held=*/true, /*sparse=*/false, &var));
    OP_REQUIRES_OK(ctx, tf::GetInputTensorFromVariable<CPUDevice, T>(
                            ctx, 1, /*lock_held=*/true, /*sparse=*/false, &accum));
    OP_REQUIRES(ctx, var.IsInitialized() && accum.IsInitialized(),
                tf::errors::FailedPrecondition("KnlLarsApply: uninitialized variable or "
                                               "momentum slot: ", requested_input(0), ", ",
                                               requested_input(1)));
    const tf::DataType dtype = tf::DataTypeToEnum<T>::value;
    OP_REQUIRES(ctx, var.dtype() == dtype && accum.dtype() == dtype,
                tf::errors::InvalidArgument("KnlLarsApply: variable dtypes ",
                                            tf::DataTypeString(var.dtype()), "/",
                                            tf::DataTypeString(accum.dtype()), " differ from T=",
                                            tf::DataTypeString(dtype)));
    const tf::Tensor& grad = ctx->input(4);
    OP_REQUIRES(ctx, var.shape().IsSameSize(accum.shape()) && var.shape().IsSameSize(grad.shape()),
                tf::errors::InvalidArgument(
                    "KnlLarsApply: var, accum and grad must have one shape, got ",
                    var.shape().DebugString(), ", ", accum.shape().DebugString(), ", ",
                    grad.shape().DebugString()));
    for (const auto& [index, name] : {std::pair<int, const char*>{2, "lr"}, {3, "momentum"},
                                       {5, "weight_decay"}, {6, "trust_coefficient"},
                                       {7, "epsilon"}}) {
      OP_REQUIRES(ctx, tf::TensorShapeUtils::IsScalar(ctx->input(index).shape()),
                  tf::errors::InvalidArgument("KnlLarsApply: ", name, " must be a scalar, got ",
                                              ctx->input(index).shape().DebugString()));
    }
    const double lr = ctx->input(2).scalar<double>()();
    const double momentum = ctx->input(3).scalar<double>()();
    const double beta = ctx->input(5).scalar<double>()();
    const double eta = ctx->input(6).scalar<double>()();
    const double eps = ctx->input(7).scalar<double>()();

    using E = Elem<T>;
    using C = typename E::Compute;
    const int64_t n = var.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const auto* w_in = Data<T>(var);
    const auto* g = Data<T>(grad);
    tf::thread::ThreadPool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;

    double t = 1.0;
    if (adapt_ && n > 0) {
      // Pass 1: per-block partial sums, then added in block order (see the header).
      std::vector<double> partial(2 * blocks);
      const bool decayed_norm = variant_ == Variant::kModelGarden && beta != 0.0;
      const auto sums = decayed_norm ? BlockSums<T, true> : BlockSums<T, false>;
      const C beta_c = static_cast<C>(beta);
      pool->ParallelFor(blocks, kSumCostPerBlock, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          sums(w_in, g, b * kBlock, std::min(n, (b + 1) * kBlock), beta_c, &partial[2 * b],
               &partial[2 * b + 1]);
        }
      });
      double ww = 0.0, dd = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        ww += partial[2 * b];
        dd += partial[2 * b + 1];
      }
      const double w_norm = std::sqrt(ww);
      const double denom =
          variant_ == Variant::kModelGarden ? std::sqrt(dd) : std::sqrt(dd) + beta * w_norm;
      if (w_norm > 0.0 && denom > 0.0) t = eta * w_norm / (denom + eps);
    }

    tf::Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({}), &out));
    out->scalar<T>()() = static_cast<T>(t);
    if (n == 0) return;

    // Pass 2: the update, element-wise; any partition gives the same result.
    const UpdateFn<T> update = PickUpdate<T>(variant_, nesterov_, beta != 0.0);
    auto* w = MutableData<T>(&var);
    auto* v = MutableData<T>(&accum);
    const C s = static_cast<C>(lr * t), m = static_cast<C>(momentum),
            beta_c = static_cast<C>(beta);
    pool->ParallelFor(blocks, kUpdateCostPerBlock, [&](int64_t b0, int64_t b1) {
      update(w, v, g, b0 * kBlock, std::min(n, b1 * kBlock), s, m, beta_c);
    });
  }

 private:
  Variant variant_ = Variant::kYou;
  bool nesterov_ = false;
  bool adapt_ = true;
};

tf::Status ShapeFn(tf::shape_inference::InferenceContext* c) {
  tf::shape_inference::ShapeHandle unused;
  for (int i : {2, 3, 5, 6, 7}) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  // The variable and slot shapes, where the resource handles carry them, must match grad.
  tf::shape_inference::ShapeHandle shape = c->input(4);
  for (int i : {0, 1}) {
    const auto* handle = c->input_handle_shapes_and_types(i);
    if (handle != nullptr && handle->size() == 1) {
      TF_RETURN_IF_ERROR(c->Merge(shape, (*handle)[0].shape, &shape));
    }
  }
  c->set_output(0, c->Scalar());
  return tf::OkStatus();
}

}  // namespace
}  // namespace knl_train

// Stateful: it writes its resource inputs, so graph optimisers must neither merge two calls
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

#define KNL_REGISTER_LARS_KERNEL(T)                                                   \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("KnlLarsApply").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      knl_train::KnlLarsApplyOp<T>)
KNL_REGISTER_LARS_KERNEL(float);
KNL_REGISTER_LARS_KERNEL(double);
KNL_REGISTER_LARS_KERNEL(::tensorflow::bfloat16);
#undef KNL_REGISTER_LARS_KERNEL
