// Batch norm's passes over float32 or bfloat16 NHWC maps as XLA FFI custom calls, for training
// on the CPU backend.
//
// XLA's CPU backend runs batch norm's reductions over every axis but the channels, and the
// passes around them, well below the speed of reading the map: nn.BatchNorm's training pass takes
// 1.4-1.9x as long as these kernels' on ResNet-18's maps, and without them the width-1/4 float32
// step ran 1.1-1.2x slower (experiments/results/train_step.md). Here each pass reads the map
// once, with the ReLU and the residual sum of a ResNet block folded in. A map is
// [rows, channels], rows = N*H*W:
//   simclr_bn_moments      sums[2, C]  = [sum x, sum x^2]
//   simclr_bn_apply        y  = x * scale + shift (+ residual), then max(., 0) if relu
//   simclr_bn_grad_sums    sums[2, C]  = [sum g, sum g * x]   g = dy, masked by y > 0 if relu
//   simclr_bn_grad_input   dx = a * g + b * x + c (+ the residual's gradient, g itself)
// The per-channel arithmetic between the passes (the cross-device sum of the statistics, mean,
// variance, a, b, c) stays in JAX: see simclr_jax/native/batch_norm.py. Sums are taken in float
// over blocks of rows and added up in double, so they do not lose precision with the batch size.
// Maps in bfloat16 (a model whose convolutions keep their outputs in bfloat16) are read as floats
// and written rounded to nearest even: the arithmetic and the sums are float32 either way, and
// the maps of one call share one type. Rows are split over XLA's own intra-op threads
// (parallel.h).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "bfloat16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using simclr_native::Bf16;
using simclr_native::Store;
using simclr_native::ToFloat;

namespace {

using Map = ffi::AnyBuffer;  // float32 or bfloat16, as x
using Sums = ffi::Buffer<ffi::F32>;
using Vector = ffi::Buffer<ffi::F32, 1>;
constexpr int64_t kBlockRows = 64;         // rows summed in float before adding into double
constexpr int64_t kLanes = 32;              // values a sum takes at once (ChannelSums)
constexpr int64_t kPartElements = 1 << 15;  // a part's size: small enough to balance the threads

// Contiguous ranges of rows, a few per thread so that a busy thread does not hold the others up.
struct RowSplit {
  int64_t rows, parts;
  RowSplit(int64_t rows, int64_t channels, ffi::ThreadPool& pool) : rows(rows) {
    const int64_t most = 4 * (static_cast<int64_t>(pool.num_threads()) + 1);
    parts = std::clamp<int64_t>(rows * channels / kPartElements, 1, std::max<int64_t>(rows, 1));
    parts = std::min(parts, most);
  }
  int64_t Begin(int64_t part) const { return rows * part / parts; }
  int64_t End(int64_t part) const { return rows * (part + 1) / parts; }
};

ffi::Error Check(bool ok, const std::string& message) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(message);
}

int64_t Channels(const Map& x) {
  auto dims = x.dimensions();
  return dims.size() == 0 ? 1 : dims[dims.size() - 1];
}

ffi::Error CheckSameShape(const Map& x, const Map& other, const char* name) {
  auto a = x.dimensions(), b = other.dimensions();
  return Check(a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()) &&
                   x.element_type() == other.element_type(),
               std::string("batch norm: ") + name + " must have the shape and type of x");
}

ffi::Error CheckVector(const Vector& v, int64_t channels, const char* name) {
  return Check(v.element_count() == channels,
               std::string("batch norm: ") + name + " must have one value per channel");
}

ffi::Error Finish(const std::string& error) {
  return error.empty() ? ffi::Error::Success() : ffi::Error::Internal(error);
}

// Eight floats as one value (GCC's and Clang's vector extension): an AVX register on x86-64.
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int64_t kVectors = kLanes / 8;

// A float (T = float) or eight (T = Vec8) from p: float32 as is, bfloat16 widened.
template <typename T>
inline T Load(const float* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

typedef uint16_t Half8 __attribute__((vector_size(16)));
typedef uint32_t Word8 __attribute__((vector_size(32)));

template <typename T>
inline T Load(const Bf16* p) {
  if constexpr (std::is_same_v<T, float>) {
    return ToFloat(*p);
  } else {
    Half8 halves;
    std::memcpy(&halves, p, sizeof(halves));
    const Word8 words = __builtin_convertvector(halves, Word8) << 16;
    T value;
    std::memcpy(&value, &words, sizeof(value));
    return value;
  }
}

// fn(element type) for the element type of x: float32 or bfloat16.
template <typename Fn>
ffi::Error ForElementType(const Map& x, const Fn& fn) {
  switch (x.element_type()) {
    case ffi::DataType::F32: return fn(float{});
    case ffi::DataType::BF16: return fn(Bf16{});
    default: return ffi::Error::InvalidArgument("batch norm: maps must be F32 or BF16");
  }
}

template <typename T>
const T* Data(const Map& m) { return static_cast<const T*>(m.untyped_data()); }
template <typename T>
T* MutableData(Map& m) { return static_cast<T*>(m.untyped_data()); }

// Adds term(at + i * stride + lane) for i in [0, count) into s0[lane], s1[lane], lane < kLanes.
// The sums stay in registers while the values stream past: summed in memory, each row's sums
// waited for the previous row's, and that chain, not reading the map, set the speed.
template <typename Term>
inline void SumLanes(const Term& term, int64_t at, int64_t count, int64_t stride,
                     float* __restrict__ s0, float* __restrict__ s1) {
  Vec8 r0[kVectors] = {}, r1[kVectors] = {};
  for (int64_t i = 0; i < count; ++i, at += stride) {
#pragma GCC unroll 4
    for (int64_t v = 0; v < kVectors; ++v) {
      Vec8 t0, t1;
      term(at + 8 * v, t0, t1);
      r0[v] += t0;
      r1[v] += t1;
    }
  }
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t lane = 0; lane < 8; ++lane) {
      s0[8 * v + lane] += r0[v][lane];
      s1[8 * v + lane] += r1[v][lane];
    }
  }
}

// sums[0][c] and sums[1][c]: the per-channel sums of the two terms term(i, t0, t1) gives for
// flat index i = row * channels + c. Each part sums blocks of kBlockRows rows in float and adds
// them up in double. Within a block, values are taken kLanes at a time (SumLanes): whole groups
// of rows when the channels divide kLanes (lane l is channel l % C), else kLanes-channel columns
// when kLanes divides the channels; other channel counts go row by row.
template <typename Term>
ffi::Error ChannelSums(ffi::ThreadPool& pool, int64_t rows, int64_t channels, float* sums,
                       const Term& term) {
  RowSplit split(rows, channels, pool);
  const int64_t width = std::max(channels, kLanes);
  std::vector<double> totals(split.parts * 2 * channels, 0.0);
  std::string error = simclr_native::RunParts(pool, split.parts, [&](int64_t part) {
    double* total = &totals[part * 2 * channels];
    std::vector<float> block(2 * width);
    float *s0 = block.data(), *s1 = block.data() + width;
    for (int64_t row = split.Begin(part), end = split.End(part); row < end; row += kBlockRows) {
      const int64_t block_rows = std::min(kBlockRows, end - row), at = row * channels;
      std::fill(block.begin(), block.end(), 0.0f);
      if (kLanes % channels == 0) {
        const int64_t values = block_rows * channels, spans = values / kLanes;
        SumLanes(term, at, spans, kLanes, s0, s1);
        for (int64_t j = spans * kLanes; j < values; ++j) {  // the last rows, fewer than kLanes
          float t0, t1;
          term(at + j, t0, t1);
          s0[j % kLanes] += t0;
          s1[j % kLanes] += t1;
        }
      } else if (channels % kLanes == 0) {
        for (int64_t c = 0; c < channels; c += kLanes) {
          SumLanes(term, at + c, block_rows, channels, s0 + c, s1 + c);
        }
      } else {
        for (int64_t j = 0; j < block_rows * channels; ++j) {
          float t0, t1;
          term(at + j, t0, t1);
          s0[j % channels] += t0;
          s1[j % channels] += t1;
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        total[j % channels] += s0[j];
        total[channels + j % channels] += s1[j];
      }
    }
  });
  for (int64_t c = 0; c < 2 * channels; ++c) {
    double sum = 0.0;
    for (int64_t part = 0; part < split.parts; ++part) sum += totals[part * 2 * channels + c];
    sums[c] = static_cast<float>(sum);
  }
  return Finish(error);
}

// each(row) for every row, over the threads.
template <typename Row>
ffi::Error EachRow(ffi::ThreadPool& pool, int64_t rows, int64_t channels, const Row& each) {
  RowSplit split(rows, channels, pool);
  return Finish(simclr_native::RunParts(pool, split.parts, [&](int64_t part) {
    for (int64_t row = split.Begin(part), end = split.End(part); row < end; ++row) each(row);
  }));
}

ffi::Error Moments(ffi::ThreadPool pool, Map x, ffi::Result<Sums> sums) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  if (auto e = Check(sums->element_count() == 2 * channels, "batch norm: sums must be [2, C]");
      e.failure()) {
    return e;
  }
  return ForElementType(x, [&](auto element) {
    const auto* data = Data<decltype(element)>(x);
    return ChannelSums(pool, rows, channels, sums->typed_data(),
                       [data](int64_t i, auto& t0, auto& t1) {
                         using T = std::decay_t<decltype(t0)>;
                         t0 = Load<T>(data + i);
                         t1 = t0 * t0;
                       });
  });
}

template <bool kRelu, bool kResidual, typename E>
void ApplyRow(const E* __restrict__ x, const float* __restrict__ scale,
              const float* __restrict__ shift, const E* __restrict__ residual,
              E* __restrict__ y, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    float v = ToFloat(x[c]) * scale[c] + shift[c];
    if (kResidual) v += ToFloat(residual[c]);
    Store(y + c, kRelu ? std::max(v, 0.0f) : v);
  }
}

template <bool kResidual>
ffi::Error ApplyPass(ffi::ThreadPool& pool, const Map& x, const Vector& scale,
                     const Vector& shift, const Map* residual, Map& y, bool relu) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  for (auto e : {CheckSameShape(x, y, "y"), CheckVector(scale, channels, "scale"),
                 CheckVector(shift, channels, "shift"),
                 kResidual ? CheckSameShape(x, *residual, "residual") : ffi::Error::Success()}) {
    if (e.failure()) return e;
  }
  return ForElementType(x, [&](auto element) {
    using E = decltype(element);
    const E* in = Data<E>(x);
    const E* add = kResidual ? Data<E>(*residual) : nullptr;
    E* out = MutableData<E>(y);
    const float *a = scale.typed_data(), *b = shift.typed_data();
    return EachRow(pool, rows, channels, [&](int64_t row) {
      const int64_t at = row * channels;
      const E* r = kResidual ? add + at : nullptr;
      if (relu) {
        ApplyRow<true, kResidual>(in + at, a, b, r, out + at, channels);
      } else {
        ApplyRow<false, kResidual>(in + at, a, b, r, out + at, channels);
      }
    });
  });
}

ffi::Error Apply(ffi::ThreadPool pool, Map x, Vector scale, Vector shift, ffi::Result<Map> y,
                 bool relu) {
  return ApplyPass<false>(pool, x, scale, shift, nullptr, *y, relu);
}

ffi::Error ApplyResidual(ffi::ThreadPool pool, Map x, Vector scale, Vector shift, Map residual,
                         ffi::Result<Map> y, bool relu) {
  return ApplyPass<true>(pool, x, scale, shift, &residual, *y, relu);
}

// g = dy where the ReLU let the value through (y > 0), 0 elsewhere; dy itself without a ReLU.
// For floats and for Vec8s (lane by lane).
template <bool kRelu, typename T>
inline T Masked(T dy, T y) {
  if constexpr (kRelu) {
    return y > T{} ? dy : T{};
  } else {
    return dy;
  }
}

template <bool kRelu>
ffi::Error GradSumsPass(ffi::ThreadPool& pool, const Map& dy, const Map& x, const Map& y,
                        Sums& sums) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  for (auto e : {CheckSameShape(x, dy, "dy"), CheckSameShape(x, y, "y"),
                 Check(sums.element_count() == 2 * channels, "batch norm: sums must be [2, C]")}) {
    if (e.failure()) return e;
  }
  return ForElementType(x, [&](auto element) {
    using E = decltype(element);
    const E *d = Data<E>(dy), *in = Data<E>(x), *out = Data<E>(y);
    return ChannelSums(pool, rows, channels, sums.typed_data(),
                       [d, in, out](int64_t i, auto& t0, auto& t1) {
                         using T = std::decay_t<decltype(t0)>;
                         t0 = Masked<kRelu>(Load<T>(d + i), Load<T>(out + i));
                         t1 = t0 * Load<T>(in + i);
                       });
  });
}

ffi::Error GradSums(ffi::ThreadPool pool, Map dy, Map x, Map y, ffi::Result<Sums> sums,
                    bool relu) {
  return relu ? GradSumsPass<true>(pool, dy, x, y, *sums)
              : GradSumsPass<false>(pool, dy, x, y, *sums);
}

template <bool kRelu, bool kResidual, typename E>
void GradInputRow(const E* __restrict__ dy, const E* __restrict__ x, const E* __restrict__ y,
                  const float* __restrict__ a, const float* __restrict__ b,
                  const float* __restrict__ c0, E* __restrict__ dx, E* __restrict__ dresidual,
                  int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const float g = Masked<kRelu>(ToFloat(dy[c]), ToFloat(y[c]));
    Store(dx + c, a[c] * g + b[c] * ToFloat(x[c]) + c0[c]);
    if (kResidual) Store(dresidual + c, g);
  }
}

template <bool kResidual>
ffi::Error GradInputPass(ffi::ThreadPool& pool, const Map& dy, const Map& x, const Map& y,
                         const Vector& a, const Vector& b, const Vector& c, Map& dx,
                         Map* dresidual, bool relu) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  for (auto e : {CheckSameShape(x, dy, "dy"), CheckSameShape(x, y, "y"),
                 CheckSameShape(x, dx, "dx"), CheckVector(a, channels, "a"),
                 CheckVector(b, channels, "b"), CheckVector(c, channels, "c"),
                 kResidual ? CheckSameShape(x, *dresidual, "the residual's gradient")
                           : ffi::Error::Success()}) {
    if (e.failure()) return e;
  }
  return ForElementType(x, [&](auto element) {
    using E = decltype(element);
    const E *d = Data<E>(dy), *in = Data<E>(x), *out = Data<E>(y);
    const float *pa = a.typed_data(), *pb = b.typed_data(), *pc = c.typed_data();
    E* grad = MutableData<E>(dx);
    E* grad_residual = kResidual ? MutableData<E>(*dresidual) : nullptr;
    return EachRow(pool, rows, channels, [&](int64_t row) {
      const int64_t at = row * channels;
      E* r = kResidual ? grad_residual + at : nullptr;
      if (relu) {
        GradInputRow<true, kResidual>(d + at, in + at, out + at, pa, pb, pc, grad + at, r,
                                      channels);
      } else {
        GradInputRow<false, kResidual>(d + at, in + at, out + at, pa, pb, pc, grad + at, r,
                                       channels);
      }
    });
  });
}

ffi::Error GradInput(ffi::ThreadPool pool, Map dy, Map x, Map y, Vector a, Vector b, Vector c,
                     ffi::Result<Map> dx, bool relu) {
  return GradInputPass<false>(pool, dy, x, y, a, b, c, *dx, nullptr, relu);
}

ffi::Error GradInputResidual(ffi::ThreadPool pool, Map dy, Map x, Map y, Vector a, Vector b,
                             Vector c, ffi::Result<Map> dx, ffi::Result<Map> dresidual,
                             bool relu) {
  return GradInputPass<true>(pool, dy, x, y, a, b, c, *dx, &(*dresidual), relu);
}

// The operands the handlers share, after XLA's thread pool: x, scale, shift for the forward
// pass, dy, x, y for the backward passes.
auto ApplyOperands() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Map>().Arg<Vector>().Arg<Vector>();
}

auto GradOperands() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Map>().Arg<Map>().Arg<Map>();
}

}  // namespace

#pragma GCC visibility push(default)  // the library is built with hidden symbols but these
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_moments, Moments,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Map>().Ret<Sums>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_apply, Apply,
                              ApplyOperands().Ret<Map>().Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_apply_residual, ApplyResidual,
                              ApplyOperands().Arg<Map>().Ret<Map>().Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_grad_sums, GradSums,
                              GradOperands().Ret<Sums>().Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_grad_input, GradInput,
                              GradOperands().Arg<Vector>().Arg<Vector>().Arg<Vector>().Ret<Map>()
                                  .Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_bn_grad_input_residual, GradInputResidual,
                              GradOperands().Arg<Vector>().Arg<Vector>().Arg<Vector>().Ret<Map>()
                                  .Ret<Map>().Attr<bool>("relu"));
#pragma GCC visibility pop
