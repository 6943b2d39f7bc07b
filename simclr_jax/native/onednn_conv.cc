// oneDNN convolutions as XLA FFI custom calls, for training on the CPU backend.
//
// XLA calls these handlers directly, on the thread that runs the computation, with the operands'
// own buffers: no Python, no copies. Three passes of a 2-D convolution, NHWC activations and HWIO
// kernels (the layouts of Flax's nn.Conv):
//   simclr_conv_forward           y  = conv(x, k)
//   simclr_conv_backward_data     dx = conv_transpose(dy, k)
//   simclr_conv_backward_weights  dk = correlate(x, dy)
// Operands are float32 or bfloat16 (oneDNN's AMX/AVX512-BF16 kernels), products summed in float32
// either way. Results are float32, or bfloat16 when the caller asks for them so (a model keeping
// its maps in bfloat16: half the memory traffic, no casts between layers); the kernel gradient is
// summed over the batch's parts in float32 and rounded once. Padding is explicit (low and high per
// spatial axis).
//
// Threads: the batch is cut into one part per thread of XLA's own intra-op pool (parallel.h), and
// oneDNN runs each part on one thread (the kernel gradient sums the parts'). oneDNN's own OpenMP
// teams made training steps erratic, 0.5-2.2 steps/s against a steady 2.5 now
// (experiments/results/train_step.md), and far slower beside other busy processes.
//
// Primitive descriptors are built once per shape and pass and kept: finding an implementation
// costs more than running a small convolution. Every call allocates its own scratchpad, so the
// same primitive can run on several threads at once.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "bfloat16.h"
#include "parallel.h"
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
  memory::data_type output_type;  // of y (forward) or dx (backward data); dk is summed in f32

  std::string Key(Pass pass) const {
    std::ostringstream key;
    key << static_cast<int>(pass) << '/' << static_cast<int>(compute_type) << '/'
        << static_cast<int>(output_type);
    for (const memory::dims* dims : {&src, &weights, &dst, &strides, &padding_low, &padding_high}) {
      key << '/';
      for (auto d : *dims) key << d << ',';
    }
    return key.str();
  }

  // The same convolution over `images` images of the batch.
  Geometry Part(int64_t images) const {
    Geometry part = *this;
    part.src[0] = part.dst[0] = images;
    return part;
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
      auto pd = ForwardDescriptor(g, g.output_type);
      return {dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Pass::kBackwardData: {
      auto hint = ForwardDescriptor(g, t);
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Activations(g.src, g.output_type),
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

// Owned, 64-byte aligned host memory for scratchpads, reordered kernels and partial sums.
struct Buffer {
  explicit Buffer(size_t bytes)
      : data(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr, &std::free) {}
  void* get() const { return data.get(); }
  std::unique_ptr<void, decltype(&std::free)> data;
};

// Runs `plan` on one thread. `weights` holds k (an input, HWIO, reordered into the plan's layout
// first) or receives dk (an output, reordered back to HWIO after).
void Execute(const Plan& plan, std::unordered_map<int, memory> args, int weights_arg,
             memory weights, bool weights_are_output) {
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  const bool reorder = plan.weights != weights.get_desc();
  Buffer reordered(reorder ? plan.weights.get_size() : 0);
  memory plan_weights = reorder ? memory(plan.weights, engine, reordered.get()) : weights;
  if (reorder && !weights_are_output) {
    dnnl::reorder(weights, plan_weights).execute(stream, weights, plan_weights);
  }
  Buffer scratchpad(plan.scratchpad.get_size());
  args.emplace(weights_arg, plan_weights);
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, engine, scratchpad.get()));
  plan.primitive.execute(stream, args);
  if (reorder && weights_are_output) {
    dnnl::reorder(plan_weights, weights).execute(stream, plan_weights, weights);
  }
  stream.wait();
}

// Runs part(i) for each part of the batch on XLA's threads (parallel.h), oneDNN on one thread
// per part.
template <typename F>
ffi::Error ParallelParts(ffi::ThreadPool& pool, int64_t parts, const F& part) {
  const std::string error = simclr_native::RunParts(pool, parts, [&](int64_t i) {
    omp_set_num_threads(1);  // this thread's oneDNN calls run on this thread alone
    part(i);
  });
  if (!error.empty()) return ffi::Error::Internal("oneDNN convolution: " + error);
  return ffi::Error::Success();
}

ffi::ErrorOr<memory::data_type> DataType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default:
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "oneDNN convolution: operands and results must be F32 or BF16"));
  }
}

// NHWC/HWIO dimensions -> oneDNN's logical NCHW/OIHW.
memory::dims Nchw(ffi::AnyBuffer::Dimensions d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims Oihw(ffi::AnyBuffer::Dimensions d) { return {d[3], d[2], d[0], d[1]}; }

ffi::ErrorOr<Geometry> MakeGeometry(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions k,
                                    ffi::AnyBuffer::Dimensions y, ffi::DataType type,
                                    ffi::DataType output_type, ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> padding_low,
                                    ffi::Span<const int64_t> padding_high) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      padding_low.size() != 2 || padding_high.size() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN convolution: expects rank-4 NHWC/HWIO operands and 2 strides and paddings"));
  }
  auto compute_type = DataType(type);
  if (compute_type.has_error()) return ffi::Unexpected(compute_type.error());
  auto result_type = DataType(output_type);
  if (result_type.has_error()) return ffi::Unexpected(result_type.error());
  auto dims = [](ffi::Span<const int64_t> s) { return memory::dims(s.begin(), s.end()); };
  return Geometry{Nchw(x), Oihw(k), Nchw(y), dims(strides), dims(padding_low),
                  dims(padding_high), *compute_type, *result_type};
}

// The batch split: part i covers images [Begin(i), Begin(i + 1)).
struct BatchSplit {
  int64_t images, parts;
  BatchSplit(int64_t images, ffi::ThreadPool& pool)
      : images(images), parts(std::max<int64_t>(1, std::min(images, pool.num_threads()))) {}
  int64_t Begin(int64_t i) const { return images * i / parts; }
  int64_t Size(int64_t i) const { return Begin(i + 1) - Begin(i); }
};

// Byte offset of image `n` in an NHWC buffer with logical dims {N, C, H, W}.
size_t ImageOffset(const memory::dims& nchw, memory::data_type type, int64_t n) {
  return static_cast<size_t>(n * nchw[1] * nchw[2] * nchw[3]) * memory::data_type_size(type);
}

char* At(void* base, size_t offset) { return static_cast<char*>(base) + offset; }

// y (or dx) = a convolution of x (or dy) with k, image by image: forward and backward data.
ffi::Error Pointwise(Pass pass, const Geometry& g, ffi::ThreadPool& pool, void* in, void* kernel,
                     void* out) {
  const bool forward = pass == Pass::kForward;
  const memory::dims& in_dims = forward ? g.src : g.dst;
  const memory::dims& out_dims = forward ? g.dst : g.src;
  BatchSplit split(in_dims[0], pool);
  return ParallelParts(pool, split.parts, [&](int64_t i) {
    const Geometry part = g.Part(split.Size(i));
    const Plan& plan = CachedPlan(part, pass);
    dnnl::engine& e = Engine();
    memory part_in(Activations(forward ? part.src : part.dst, g.compute_type), e,
                   At(in, ImageOffset(in_dims, g.compute_type, split.Begin(i))));
    memory part_out(Activations(forward ? part.dst : part.src, g.output_type), e,
                    At(out, ImageOffset(out_dims, g.output_type, split.Begin(i))));
    memory k(UserWeights(g.weights, g.compute_type), e, kernel);
    if (forward) {
      Execute(plan, {{DNNL_ARG_SRC, part_in}, {DNNL_ARG_DST, part_out}}, DNNL_ARG_WEIGHTS, k,
              false);
    } else {
      Execute(plan, {{DNNL_ARG_DIFF_DST, part_in}, {DNNL_ARG_DIFF_SRC, part_out}},
              DNNL_ARG_WEIGHTS, k, false);
    }
  });
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer k,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding_low,
                       ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), x.element_type(),
                        y->element_type(), strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  return Pointwise(Pass::kForward, *g, pool, x.untyped_data(), k.untyped_data(),
                   y->untyped_data());
}

ffi::Error ConvBackwardData(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer k,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> strides,
                            ffi::Span<const int64_t> padding_low,
                            ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(), dy.element_type(),
                        dx->element_type(), strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  return Pointwise(Pass::kBackwardData, *g, pool, dy.untyped_data(), k.untyped_data(),
                   dx->untyped_data());
}

// dk = the sum over parts of each part's float32 kernel gradient (part 0 writes into a float32 dk
// itself), rounded once if dk is bfloat16.
ffi::Error ConvBackwardWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dk, ffi::Span<const int64_t> strides,
                               ffi::Span<const int64_t> padding_low,
                               ffi::Span<const int64_t> padding_high) {
  auto g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), x.element_type(),
                        dk->element_type(), strides, padding_low, padding_high);
  if (g.has_error()) return g.error();
  const memory::data_type f32 = memory::data_type::f32;
  const bool float32_result = g->output_type == f32;
  const int64_t kernel_size = dk->element_count();
  BatchSplit split(g->src[0], pool);
  std::vector<Buffer> partial_sums;
  for (int64_t i = float32_result ? 1 : 0; i < split.parts; ++i) {
    partial_sums.emplace_back(kernel_size * sizeof(float));
  }
  auto partial_sum = [&](int64_t i) {
    return float32_result ? (i == 0 ? dk->untyped_data() : partial_sums[i - 1].get())
                          : partial_sums[i].get();
  };
  ffi::Error error = ParallelParts(pool, split.parts, [&](int64_t i) {
    const Geometry part = g->Part(split.Size(i));
    const Plan& plan = CachedPlan(part, Pass::kBackwardWeights);
    dnnl::engine& e = Engine();
    memory part_x(Activations(part.src, g->compute_type), e,
                  At(x.untyped_data(), ImageOffset(g->src, g->compute_type, split.Begin(i))));
    memory part_dy(Activations(part.dst, g->compute_type), e,
                   At(dy.untyped_data(), ImageOffset(g->dst, g->compute_type, split.Begin(i))));
    memory part_dk(UserWeights(g->weights, f32), e, partial_sum(i));
    Execute(plan, {{DNNL_ARG_SRC, part_x}, {DNNL_ARG_DIFF_DST, part_dy}}, DNNL_ARG_DIFF_WEIGHTS,
            part_dk, true);
  });
  if (error.failure()) return error;
  float* sum = static_cast<float*>(partial_sum(0));
  for (int64_t i = 1; i < split.parts; ++i) {
    const float* addend = static_cast<const float*>(partial_sum(i));
    for (int64_t j = 0; j < kernel_size; ++j) sum[j] += addend[j];
  }
  if (!float32_result) {
    auto* rounded = static_cast<simclr_native::Bf16*>(dk->untyped_data());
    for (int64_t j = 0; j < kernel_size; ++j) simclr_native::Store(rounded + j, sum[j]);
  }
  return ffi::Error::Success();
}

}  // namespace

#define SIMCLR_CONV_HANDLER(name, function)                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,                                  \
                                ffi::Ffi::Bind()                                 \
                                    .Ctx<ffi::ThreadPool>()                      \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Ret<ffi::AnyBuffer>()                       \
                                    .Attr<ffi::Span<const int64_t>>("strides")   \
                                    .Attr<ffi::Span<const int64_t>>("padding_low") \
                                    .Attr<ffi::Span<const int64_t>>("padding_high"));

#pragma GCC visibility push(default)  // the library is built with hidden symbols but these
SIMCLR_CONV_HANDLER(simclr_conv_forward, ConvForward)
SIMCLR_CONV_HANDLER(simclr_conv_backward_data, ConvBackwardData)
SIMCLR_CONV_HANDLER(simclr_conv_backward_weights, ConvBackwardWeights)
#pragma GCC visibility pop
