// SimCLR augmentations as an XLA FFI custom call, for the CPU backend.
//
// simclr_jax/augment.py draws every random number of a view in JAX; this kernel only applies a
// run of consecutive ops given those numbers. XLA compiles the same ops as a dozen passes over
// the whole batch, each costing ~2 ns per element on CPU (layout copies, the saturation/hue
// passes, the crop's two). Here each image goes through all its steps while it sits in one
// thread's cache, as three channel planes, and the batch is split over XLA's CPU threads
// (parallel.h).
//
//   simclr_augment_steps(images f32[..., H, W, 3], params f32[..., P]) -> views f32[..., h, w, 3]
//
// The attribute `steps` lists the op codes (Step below) in order, and `params` holds each image's
// numbers for them, step after step (integers are exact in float32). A crop resizes to the
// views' size; the other steps keep the size. Views are clipped to [0, 1]. Each step equals its
// JAX namesake in augment.py, which documents it, up to float32 rounding: sums run in a
// different order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Op codes and the numbers each takes from `params`:
enum Step : int64_t {
  kCrop = 0,         // top, left, height, width: that box alone resized (bicubic) to the views'
                     // size
  kFlip = 1,         // apply
  kColorJitter = 2,  // apply, order[4] (Jitter codes), brightness gain and shift, contrast,
                     // saturation, hue
  kGrayscale = 3,    // apply
  kBlur = 4,         // apply, sigma, radius
};
enum Jitter { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

int64_t ParamCount(int64_t step) {
  switch (step) {
    case kCrop: return 4;
    case kFlip: case kGrayscale: return 1;
    case kColorJitter: return 10;
    case kBlur: return 3;
    default: return -1;
  }
}

// One image as three channel planes. A plane is stored row-major, or transposed (the image's
// columns as rows): a resize along the stored rows vectorises and one along the stored columns
// does not, so the crop transposes between its two passes and hands on a transposed image.
struct Planes {
  int64_t height = 0, width = 0;
  bool transposed = false;
  std::vector<float> data;

  void Reshape(int64_t new_height, int64_t new_width, bool new_transposed) {
    height = new_height;
    width = new_width;
    transposed = new_transposed;
    data.resize(3 * height * width);
  }
  int64_t size() const { return height * width; }
  int64_t rows() const { return transposed ? width : height; }  // as stored
  int64_t columns() const { return transposed ? height : width; }
  float* plane(int channel) { return data.data() + channel * size(); }
};

float Clip(float x) { return std::min(std::max(x, 0.0f), 1.0f); }

// floor(x) for |x| < 2^31, in operations the compiler vectorises without SSE4.1.
float Floor(float x) {
  const float truncated = static_cast<float>(static_cast<int32_t>(x));
  return truncated > x ? truncated - 1.0f : truncated;
}

// ---------------------------------------------------------------------------------------------
// Crop, then bicubic resize of the crop alone (augment.crop_and_resize): separable, one axis
// after the other.

// tf.image.resize's bicubic kernel tabulates the cubic at multiples of 1 / this many pixels
// (augment.BICUBIC_TABLE_SIZE).
constexpr float kBicubicTableSize = 1024.0f;

// Keys' cubic convolution kernel with a = -0.5 (augment._keys_cubic).
float KeysCubic(float distance) {
  distance = std::fabs(distance);
  const float near = (1.5f * distance - 2.5f) * distance * distance + 1.0f;
  const float far = ((-0.5f * distance + 2.5f) * distance - 4.0f) * distance + 2.0f;
  return distance <= 1.0f ? near : distance < 2.0f ? far : 0.0f;
}

// A linear map between images along one axis, as sums of rows: output row o is the sum of the
// `count` input rows from first[o] on, weighted by weights[k * outputs + o] (k-major, so that
// computing them vectorises over the outputs). `CombineRows` applies it.
struct RowTaps {
  std::vector<int32_t> first;
  std::vector<float> weights;
  int64_t count = 0, outputs = 0;

  void Reshape(int64_t new_count, int64_t new_outputs) {
    count = new_count;
    outputs = new_outputs;
    first.resize(outputs);
    weights.resize(count * outputs);
  }

  // tf.image.resize's bicubic (no antialias) of the `length` inputs from `start` on to
  // `output_size` outputs, as augment._bicubic_weights: half-pixel centres, 4 Keys taps at the
  // sample position rounded to TF's table (kBicubicTableSize), the taps outside the crop weighted
  // 0 and the rest renormalised. A crop of fewer than 4 pixels has fewer rows to combine.
  void Bicubic(float start, float length, int64_t output_size) {
    const int64_t crop_start = static_cast<int64_t>(start), crop = static_cast<int64_t>(length);
    Reshape(std::min<int64_t>(4, crop), output_size);
    std::fill(weights.begin(), weights.end(), 0.0f);
    const float scale = length / static_cast<float>(output_size);
    for (int64_t o = 0; o < outputs; ++o) {
      const float position = (static_cast<float>(o) + 0.5f) * scale - 0.5f;
      const float below = std::floor(position);
      const float fraction =
          std::nearbyint((position - below) * kBicubicTableSize) / kBicubicTableSize;
      const int64_t nearest = static_cast<int64_t>(below);
      const int64_t first_tap = std::min(std::max<int64_t>(nearest - 1, 0), crop - count);
      first[o] = static_cast<int32_t>(crop_start + first_tap);
      float sum = 0.0f;
      for (int64_t t = -1; t <= 2; ++t) {
        const int64_t tap = nearest + t;  // in the crop, or weighted 0
        if (tap < 0 || tap >= crop) continue;
        const float weight = KeysCubic(fraction - static_cast<float>(t));
        weights[(tap - first_tap) * outputs + o] = weight;
        sum += weight;
      }
      for (int64_t k = 0; k < count; ++k) weights[k * outputs + o] /= sum;
    }
  }

  // Convolution with `taps` (centred), zero padded: output o = sum_t taps[t] * input
  // (o + t - radius), for `size` rows.
  void Convolution(const std::vector<float>& taps, int64_t size) {
    const int64_t radius = static_cast<int64_t>(taps.size()) / 2;
    Reshape(std::min<int64_t>(size, taps.size()), size);
    for (int64_t o = 0; o < outputs; ++o) {
      first[o] = static_cast<int32_t>(std::min(std::max<int64_t>(0, o - radius), size - count));
      for (int64_t k = 0; k < count; ++k) {
        const int64_t t = first[o] + k - o + radius;  // the tap on input first[o] + k
        weights[k * outputs + o] = t >= 0 && t < static_cast<int64_t>(taps.size()) ? taps[t] : 0;
      }
    }
  }

  float weight(int64_t o, int64_t k) const { return weights[k * outputs + o]; }
  // The inputs any output reads: [begin(), end()).
  int64_t begin() const { return *std::min_element(first.begin(), first.end()); }
  int64_t end() const { return *std::max_element(first.begin(), first.end()) + count; }
};

// Per-thread buffers, reused from image to image.
struct Workspace {
  Planes image, scratch;
  RowTaps outer_taps, inner_taps;
  std::vector<float> rows, transposed_rows, padded;
};

// Output row o = sum_k weight(o, k) * input row (first[o] + k - first_row), `columns` wide.
// Taps go four at a time through each output row: one pass per row for a crop.
void CombineRows(const RowTaps& taps, const float* in, int64_t first_row, int64_t in_stride,
                 int64_t columns, float* out) {
  for (int64_t o = 0; o < taps.outputs; ++o) {
    float* row = out + o * columns;
    for (int64_t k = 0; k < taps.count; k += 4) {
      float w[4];
      const float* in_rows[4];
      for (int j = 0; j < 4; ++j) {
        const bool tap = k + j < taps.count;  // else weight 0 on a row that exists
        w[j] = tap ? taps.weight(o, k + j) : 0.0f;
        in_rows[j] = in + (taps.first[o] + (tap ? k + j : k) - first_row) * in_stride;
      }
      const float *r0 = in_rows[0], *r1 = in_rows[1], *r2 = in_rows[2], *r3 = in_rows[3];
      if (k == 0) {
        for (int64_t x = 0; x < columns; ++x) {
          row[x] = w[0] * r0[x] + w[1] * r1[x] + w[2] * r2[x] + w[3] * r3[x];
        }
      } else {
        for (int64_t x = 0; x < columns; ++x) {
          row[x] += w[0] * r0[x] + w[1] * r1[x] + w[2] * r2[x] + w[3] * r3[x];
        }
      }
    }
  }
}

// An image to crop: planes (transposed or not), or the call's interleaved [H, W, 3] input.
struct Source {
  const float* data;
  int64_t rows, columns;  // as stored, per channel
  bool transposed, interleaved;
};

Source Of(const Planes& image) {
  return {image.data.data(), image.rows(), image.columns(), image.transposed, false};
}

// The box [top, top + box_height) x [left, left + box_width) of `image` resized alone (bicubic,
// as tf.image.resize) to height x width, clipped to [0, 1] (the cubic overshoots), into `out`
// with the other layout.
void CropAndResize(const Source& image, const float* box, int64_t height, int64_t width,
                   Planes& out, Workspace& work) {
  // The stored rows' axis first, resized along the columns of the storage; then the other.
  const bool rows_are_y = !image.transposed;
  const float* outer_box = rows_are_y ? box : box + 1;  // start, then length 2 further on
  const float* inner_box = rows_are_y ? box + 1 : box;
  const int64_t outer_size = rows_are_y ? height : width, inner_size = rows_are_y ? width : height;
  work.outer_taps.Bicubic(outer_box[0], outer_box[2], outer_size);
  work.inner_taps.Bicubic(inner_box[0], inner_box[2], inner_size);
  const int64_t inner_begin = work.inner_taps.begin();
  const int64_t inner_read = work.inner_taps.end() - inner_begin;
  work.rows.resize(3 * outer_size * inner_read);
  work.transposed_rows.resize(inner_read * outer_size);
  // Along the stored columns: per plane, or the three interleaved channels in one go.
  const int64_t together = image.interleaved ? 3 : 1;
  for (int c = 0; c < 3; c += together) {
    const float* plane = image.data + c * image.rows * image.columns;
    CombineRows(work.outer_taps, plane + inner_begin * together, 0, image.columns * together,
                inner_read * together,
                work.rows.data() + c * outer_size * inner_read);
  }
  // Where channel c's (o, i) is in `rows`.
  const int64_t channel_step = image.interleaved ? 1 : outer_size * inner_read;
  const int64_t row_step = inner_read * together;
  out.Reshape(height, width, !image.transposed);
  for (int c = 0; c < 3; ++c) {
    const float* rows = work.rows.data() + c * channel_step;
    for (int64_t o = 0; o < outer_size; ++o) {
      for (int64_t i = 0; i < inner_read; ++i) {
        work.transposed_rows[i * outer_size + o] = rows[o * row_step + i * together];
      }
    }
    float* result = out.plane(c);  // along the other axis, now the stored columns' one
    CombineRows(work.inner_taps, work.transposed_rows.data(), inner_begin, outer_size,
                outer_size, result);
    for (int64_t i = 0; i < out.size(); ++i) result[i] = Clip(result[i]);
  }
}

// Reverses each row, or the order of the rows of a transposed image.
void FlipLeftRight(Planes& image) {
  const int64_t rows = image.rows(), columns = image.columns();
  for (int c = 0; c < 3; ++c) {
    float* plane = image.plane(c);
    for (int64_t row = 0; row < rows; ++row) {
      float* begin = plane + row * columns;
      if (!image.transposed) {
        std::reverse(begin, begin + columns);
      } else if (2 * row < rows - 1) {
        std::swap_ranges(begin, begin + columns, plane + (rows - 1 - row) * columns);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Colour.

// clip(gain * x + shift, 0, 1) on one plane.
void Affine(float* plane, int64_t size, float gain, float shift) {
  for (int64_t i = 0; i < size; ++i) plane[i] = Clip(gain * plane[i] + shift);
}

float Mean(const float* plane, int64_t size) {
  constexpr int kLanes = 16;  // independent partial sums: vectorised, and more exact
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += plane[i + lane];
  }
  double sum = 0.0;
  for (; i < size; ++i) sum += plane[i];
  for (float p : partial) sum += p;
  return static_cast<float>(sum / static_cast<double>(size));
}

// tf.image.adjust_contrast: x -> mean + factor * (x - mean) per channel, clipped.
void AdjustContrast(Planes& image, float factor) {
  for (int c = 0; c < 3; ++c) {
    const float mean = Mean(image.plane(c), image.size());
    Affine(image.plane(c), image.size(), factor, (1.0f - factor) * mean);
  }
}

// tf.image.adjust_saturation (x factor) then adjust_hue (+ delta turns) in one pass on RGB
// planes, clipped: augment._saturation_and_hue_planes, whose docstring derives it.
void SaturationAndHue(Planes& image, float saturation, float hue) {
  const float shift = 6.0f * (hue - Floor(hue));  // in sextants, [0, 6): the same turn
  float* red = image.plane(0);
  float* green = image.plane(1);
  float* blue = image.plane(2);
  const int64_t size = image.size();
  for (int64_t i = 0; i < size; ++i) {
    const float r = red[i], g = green[i], b = blue[i];
    const float value = std::max(std::max(r, g), b);
    const float minimum = std::min(std::min(r, g), b);
    float chroma = value - minimum;
    float numerator = value == g ? b - r + 2.0f * chroma : r - g + 4.0f * chroma;
    numerator = value == r ? g - b : numerator;
    float sextant = numerator / (chroma > 0.0f ? chroma : 1.0f) + shift;  // in [-1, 11)
    sextant += sextant < 0.0f ? 6.0f : 0.0f;  // wrap to [0, 6) (6 and 0 give the same colour)
    sextant -= sextant >= 6.0f ? 6.0f : 0.0f;
    chroma = std::min(chroma * saturation, value);
    const float low = value - chroma;
    red[i] = Clip(low + chroma * Clip(std::fabs(sextant - 3.0f) - 1.0f));
    green[i] = Clip(low + chroma * Clip(2.0f - std::fabs(sextant - 2.0f)));
    blue[i] = Clip(low + chroma * Clip(2.0f - std::fabs(sextant - 4.0f)));
  }
}

// The official colour jitter with given factors: the four ops in `order`, clipping after each.
// Saturation and hue commute, so neighbours run as one pass.
void ColorJitter(Planes& image, const float* params) {
  const float* order = params + 1;
  const float brightness_gain = params[5], brightness_shift = params[6], contrast = params[7],
              saturation = params[8], hue = params[9];
  for (int position = 0; position < 4; ++position) {
    const int op = static_cast<int>(order[position]);
    if (op == kBrightness) {
      for (int c = 0; c < 3; ++c) {
        Affine(image.plane(c), image.size(), brightness_gain, brightness_shift);
      }
    } else if (op == kContrast) {
      AdjustContrast(image, contrast);
    } else {
      const int other = op == kSaturation ? kHue : kSaturation;
      const bool merged = position < 3 && static_cast<int>(order[position + 1]) == other;
      position += merged;
      SaturationAndHue(image, op == kSaturation || merged ? saturation : 1.0f,
                       op == kHue || merged ? hue : 0.0f);
    }
  }
}

// tf.image.rgb_to_grayscale (Rec. 601 luma) in all three channels.
void Grayscale(Planes& image) {
  float* red = image.plane(0);
  float* green = image.plane(1);
  float* blue = image.plane(2);
  for (int64_t i = 0; i < image.size(); ++i) {
    const float luma = 0.2989f * red[i] + 0.5870f * green[i] + 0.1140f * blue[i];
    red[i] = green[i] = blue[i] = luma;
  }
}

// The official separable Gaussian blur (augment.blur_with_sigma): 2 * radius + 1 taps, zero
// padding, along the image's rows then its columns, clipped.
void Blur(Planes& image, float sigma, int64_t radius, Workspace& work) {
  std::vector<float> taps(2 * radius + 1);
  float sum = 0.0f;
  for (size_t t = 0; t < taps.size(); ++t) {
    const float offset = static_cast<float>(static_cast<int64_t>(t) - radius);
    taps[t] = std::exp(-(offset * offset) / (2.0f * (sigma * sigma)));
    sum += taps[t];
  }
  for (float& tap : taps) tap /= sum;
  const int64_t rows = image.rows(), columns = image.columns();
  RowTaps& across_rows = work.outer_taps;  // within a stored row: shifted copies of a padded row
  across_rows.Reshape(taps.size(), 1);
  across_rows.first[0] = 0;
  std::copy(taps.begin(), taps.end(), across_rows.weights.begin());
  RowTaps& across_columns = work.inner_taps;
  across_columns.Convolution(taps, rows);
  work.padded.assign(columns + 2 * radius, 0.0f);
  auto along_rows = [&](const float* in, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(in + r * columns, in + (r + 1) * columns, work.padded.begin() + radius);
      CombineRows(across_rows, work.padded.data(), 0, 1, columns, out + r * columns);
    }
  };
  auto along_columns = [&](const float* in, float* out) {
    CombineRows(across_columns, in, 0, columns, columns, out);
  };
  work.scratch.Reshape(image.height, image.width, image.transposed);
  for (int c = 0; c < 3; ++c) {
    float* plane = image.plane(c);
    float* blurred_once = work.scratch.plane(c);
    if (!image.transposed) {
      along_rows(plane, blurred_once);
      along_columns(blurred_once, plane);
    } else {
      along_columns(plane, blurred_once);
      along_rows(blurred_once, plane);
    }
    for (int64_t i = 0; i < image.size(); ++i) plane[i] = Clip(plane[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// The call.

void AugmentOne(const float* in, int64_t height, int64_t width, const float* params,
                ffi::Span<const int64_t> steps, float* out, int64_t out_height,
                int64_t out_width, Workspace& work) {
  Planes& image = work.image;
  size_t first_step = 0;
  if (steps.size() > 0 && steps[0] == kCrop) {  // straight from the interleaved input
    CropAndResize({in, height, width, false, true}, params, out_height, out_width, image, work);
    params += ParamCount(kCrop);
    first_step = 1;
  } else {
    image.Reshape(height, width, false);
    for (int64_t i = 0; i < image.size(); ++i) {
      for (int c = 0; c < 3; ++c) image.data[c * image.size() + i] = in[3 * i + c];
    }
  }
  for (size_t s = first_step; s < steps.size(); ++s) {
    const int64_t step = steps[s];
    const bool apply = params[0] != 0.0f;
    switch (step) {
      case kCrop:
        CropAndResize(Of(image), params, out_height, out_width, work.scratch, work);
        std::swap(image, work.scratch);
        break;
      case kFlip:
        if (apply) FlipLeftRight(image);
        break;
      case kColorJitter:
        if (apply) ColorJitter(image, params);
        break;
      case kGrayscale:
        if (apply) Grayscale(image);
        break;
      case kBlur:
        if (apply) Blur(image, params[1], static_cast<int64_t>(params[2]), work);
        break;
    }
    params += ParamCount(step);
  }
  const int64_t row_step = image.transposed ? 1 : image.width;  // between (y, x) and (y + 1, x)
  const int64_t column_step = image.transposed ? image.height : 1;
  for (int64_t y = 0; y < image.height; ++y) {
    for (int64_t x = 0; x < image.width; ++x) {
      for (int c = 0; c < 3; ++c) {
        *out++ = Clip(image.data[c * image.size() + y * row_step + x * column_step]);
      }
    }
  }
}

int64_t Product(ffi::Span<const int64_t> dims) {
  int64_t product = 1;
  for (int64_t d : dims) product *= d;
  return product;
}

ffi::Error AugmentSteps(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                        ffi::Buffer<ffi::F32> params, ffi::ResultBuffer<ffi::F32> views,
                        ffi::Span<const int64_t> steps) {
  const auto in_dims = images.dimensions(), out_dims = views->dimensions(),
             param_dims = params.dimensions();
  const size_t rank = in_dims.size();
  auto invalid = [](const std::string& message) {
    return ffi::Error::InvalidArgument("simclr_augment_steps: " + message);
  };
  if (rank < 3 || in_dims[rank - 1] != 3 || out_dims.size() != rank ||
      out_dims[rank - 1] != 3 || param_dims.size() != rank - 2) {
    return invalid("expects images [..., H, W, 3], params [..., P] and views [..., h, w, 3]");
  }
  int64_t param_count = 0;
  bool crops = false;
  for (int64_t step : steps) {
    if (ParamCount(step) < 0) return invalid("unknown step " + std::to_string(step));
    param_count += ParamCount(step);
    crops |= step == kCrop;
  }
  const auto batch_dims = in_dims.first(rank - 3);
  if (!std::equal(batch_dims.begin(), batch_dims.end(), out_dims.begin()) ||
      !std::equal(batch_dims.begin(), batch_dims.end(), param_dims.begin()) ||
      param_dims[rank - 3] != param_count) {
    return invalid("batch dimensions or the number of params do not match the steps");
  }
  const int64_t height = in_dims[rank - 3], width = in_dims[rank - 2];
  const int64_t out_height = out_dims[rank - 3], out_width = out_dims[rank - 2];
  if (!crops && (out_height != height || out_width != width)) {
    return invalid("the views' size differs from the images' but no step crops");
  }
  const float* in = images.typed_data();
  const float* numbers = params.typed_data();
  float* out = views->typed_data();
  // Four chunks of images per thread (parallel.h), for balance.
  const int64_t count = Product(batch_dims);
  const int64_t chunks = std::min<int64_t>(count, 4 * std::max<int64_t>(1, pool.num_threads()));
  const std::string error = simclr_native::RunParts(pool, chunks, [&](int64_t chunk) {
    Workspace work;
    for (int64_t i = chunk * count / chunks; i < (chunk + 1) * count / chunks; ++i) {
      AugmentOne(in + i * height * width * 3, height, width, numbers + i * param_count, steps,
                 out + i * out_height * out_width * 3, out_height, out_width, work);
    }
  });
  if (!error.empty()) return ffi::Error::Internal("simclr_augment_steps: " + error);
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)  // the library is built with hidden symbols but this
XLA_FFI_DEFINE_HANDLER_SYMBOL(simclr_augment_steps, AugmentSteps,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // images
                                  .Arg<ffi::Buffer<ffi::F32>>()  // params
                                  .Ret<ffi::Buffer<ffi::F32>>()  // views
                                  .Attr<ffi::Span<const int64_t>>("steps"));
#pragma GCC visibility pop
