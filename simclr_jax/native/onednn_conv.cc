// oneDNN convolutions as XLA FFI custom calls, for training on the CPU backend.
//
// XLA calls these handlers directly, on the thread that runs the computation, with the operands'
// own buffers: no Python, no copies. Three passes of a 2-D convolution, NHWC activations and HWIO
// kernels (the layouts of Flax's nn.Conv):
//   simclr_conv_forward           y  = conv(x, k)
//   simclr_conv_backward_data     dx = conv_transpose(dy, k)
//   simclr_conv_backward_weights  dk = correlate(x, dy)
// Operands are float32 or bfloat16 (oneDNN's AMX/AVX512-BF16 kernels); results are float32, with
// products summed in float32 either way. Padding is explicit (low and high per spatial axis).
//
// Primitive descriptors are built once per shape and pass and kept: finding an implementation
// costs more than running a small convolution. Every call allocates its own scratchpad, so the
// same primitive can run on several devices' threads at once.

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Pass { kForward, kBackwardData, kBackwardWeights };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A convolution's geometry in oneDNN's logical order (NCHW activations, OIHW kernels).
struct Geometry {
  memory::dims src, weights, dst, strides, padding_low, padding_high;
  memory::data_type compute_type;

  std::string Key(Pass pass) const {
    std::ostringstream key;
    key << static_cast<int>(pass) << '/' << static_cast<int>(compute_type);
    for (const memory::dims* dims : {&src, &weights, &dst, &strides, &padding_low, &padding_high}) {
      key << '/';
      for (auto d : *dims) key << d << ',';
    }
    return key.str();
  }
};

memory::desc Activations(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::nhwc);
}

memory::desc UserWeights(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::hwio);
}

memory::desc AnyWeights(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::any);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The forward descriptor; backward passes need it as a hint. Its destination has the type the
// backward passes read dy in.
dnnl::convolution_forward::primitive_desc ForwardDescriptor(const Geometry& g,
                                                            memory::data_type dst_type) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Activations(g.src, g.compute_type), AnyWeights(g.weights, g.compute_type),
      Activations(g.dst, dst_type), g.strides, g.padding_low, g.padding_high, UserScratchpad());
}

// A primitive ready to run, with the kernel layout it wants (reordered from HWIO around it).
struct Plan {
  dnnl::primitive primitive;
  memory::desc weights;  // the layout of k (forward, backward data) or dk (backward weights)
  memory::desc scratchpad;
};

Plan MakePlan(const Geometry& g, Pass pass) {
  const memory::data_type t = g.compute_type, f32 = memory::data_type::f32;
  switch (pass) {
    case Pass::kForward: {
      auto pd = ForwardDescriptor(g, f32);
      return {dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Pass::kBackwardData: {
      auto hint = ForwardDescriptor(g, t);
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Activations(g.src, f32),
          AnyWeights(g.weights, t), Activations(g.dst, t), g.strides, g.padding_low,
          g.padding_high, hint, UserScratchpad());
      return {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Pass::kBackwardWeights: {
      auto hint = ForwardDescriptor(g, t);
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Activations(g.src, t),
          AnyWeights(g.weights, f32), Activations(g.dst, t), g.strides, g.padding_low,
          g.padding_high, hint, UserScratchpad());
      return {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
              pd.scratchpad_desc()};
    }
  }
  throw std::logic_error("unknown pass");
}

const Plan& CachedPlan(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  const std::string key = g.Key(pass);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, std::make_unique<Plan>(MakePlan(g, pass))).first;
  }
  return *it->second;
}

// Owned, 64-byte aligned host memory for the scratchpad and reordered kernels.
struct Buffer {
  explicit Buffer(size_t bytes)
      : data(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr, &std::free) {}
  std::unique_ptr<void, decltype(&std::free)> data;
};

ffi::ErrorOr<memory::data_type> ComputeType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default:
      return ffi::Unexpected(
          ffi::Error::InvalidArgument("oneDNN convolution: operands must be F32 or BF16"));
  }
}

// NHWC/HWIO dimensions -> oneDNN's logical NCHW/OIHW.
memory::dims Nchw(ffi::AnyBuffer::Dimensions d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims Oihw(ffi::AnyBuffer::Dimensions d) { return {d[3], d[2], d[0], d[1]}; }

ffi::ErrorOr<Geometry> MakeGeometry(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions k,
                                    ffi::AnyBuffer::Dimensions y, ffi::DataType type,
                                    ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> padding_low,
                                    ffi::Span<const int64_t> padding_high) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding_low.size() != 2 || padding_high.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN convolution: expects rank-4 NHWC/HWIO operands and 2 strides and paddings"));
  }
  auto compute_type = ComputeType(type);
  if (compute_type.has_error()) return ffi::Unexpected(compute_type.error());
  auto dims = [](ffi::Span<const int64_t> s) { return memory::dims(s.begin(), s.end()); };
  return Geometry{Nchw(x), Oihw(k), Nchw(y), dims(strides), dims(padding_low),
                  dims(padding_high), *compute_type};
}

// Runs `plan`; `user_weights` (HWIO) is reordered into or out of the plan's kernel layout.
void Run(const Plan& plan, std::unordered_map<int, memory> args, int weights_arg,
         void* user_weights, const memory::desc& user_weights_desc, bool weights_are_output) {
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  memory user(user_weights_desc, engine, user_weights);
  Buffer reordered(plan.weights == user_weights_desc ? 0 : plan.weights.get_size());
  memory weights = reordered.data ? memory(plan.weights, engine, reordered.data.get()) : user;
  if (reordered.data && !weights_are_output) dnnl::reorder(user, weights).execute(stream, user, weights);
  Buffer scratchpad(plan.scratchpad.get_size());
  args.emplace(weights_arg, weights);
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, engine, scratchpad.data.get()));
  plan.primitive.execute(stream, args);
  if (reordered.data && weights_are_output) dnnl::reorder(weights, user).execute(stream, weights, user);
  stream.wait();
}

template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    f();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding_low,
                       ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), x.element_type(),
                        strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  return Guarded([&] {
    const Plan& plan = CachedPlan(*g, Pass::kForward);
    dnnl::engine& e = Engine();
    Run(plan,
        {{DNNL_ARG_SRC, memory(Activations(g->src, g->compute_type), e, x.untyped_data())},
         {DNNL_ARG_DST, memory(Activations(g->dst, memory::data_type::f32), e, y->untyped_data())}},
        DNNL_ARG_WEIGHTS, k.untyped_data(), UserWeights(g->weights, g->compute_type), false);
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Span<const int64_t> strides,
                            ffi::Span<const int64_t> padding_low,
                            ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(), dy.element_type(),
                        strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  return Guarded([&] {
    const Plan& plan = CachedPlan(*g, Pass::kBackwardData);
    dnnl::engine& e = Engine();
    Run(plan,
        {{DNNL_ARG_DIFF_DST, memory(Activations(g->dst, g->compute_type), e, dy.untyped_data())},
         {DNNL_ARG_DIFF_SRC,
          memory(Activations(g->src, memory::data_type::f32), e, dx->untyped_data())}},
        DNNL_ARG_WEIGHTS, k.untyped_data(), UserWeights(g->weights, g->compute_type), false);
  });
}

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dk, ffi::Span<const int64_t> strides,
                               ffi::Span<const int64_t> padding_low,
                               ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), x.element_type(),
                        strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  return Guarded([&] {
    const Plan& plan = CachedPlan(*g, Pass::kBackwardWeights);
    dnnl::engine& e = Engine();
    Run(plan,
        {{DNNL_ARG_SRC, memory(Activations(g->src, g->compute_type), e, x.untyped_data())},
         {DNNL_ARG_DIFF_DST, memory(Activations(g->dst, g->compute_type), e, dy.untyped_data())}},
        DNNL_ARG_DIFF_WEIGHTS, dk->untyped_data(),
        UserWeights(g->weights, memory::data_type::f32), true);
  });
}

}  // namespace

#define SIMCLR_CONV_HANDLER(name, function, first, second)                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,                                  \
                                ffi::Ffi::Bind()                                 \
                                    .Arg<ffi::AnyBuffer>() /* first */           \
                                    .Arg<ffi::AnyBuffer>() /* second */          \
                                    .Ret<ffi::AnyBuffer>()                       \
                                    .Attr<ffi::Span<const int64_t>>("strides")   \
                                    .Attr<ffi::Span<const int64_t>>("padding_low") \
                                    .Attr<ffi::Span<const int64_t>>("padding_high"));

#pragma GCC visibility push(default)  // the library is built with hidden symbols but these
SIMCLR_CONV_HANDLER(simclr_conv_forward, ConvForward, x, k)
SIMCLR_CONV_HANDLER(simclr_conv_backward_data, ConvBackwardData, dy, k)
SIMCLR_CONV_HANDLER(simclr_conv_backward_weights, ConvBackwardWeights, x, dy)
#pragma GCC visibility pop
