// vlexport C++ preprocessing: the image preprocessing and prompt expansion of a vlexport bundle, for C++ apps.
//
// Dependency-free C++17. Matches vlexport.preprocess (Python), which itself matches Hugging Face's CLIP image
// processor with its PIL backend:
//   * shortest-edge resize with int() rounding of the long side (or a fixed height x width),
//   * Pillow's Image.resize(size, resample) for 8-bit RGB, reimplemented to give bit-identical uint8 output
//     (separable convolution, 22-bit fixed-point coefficients, horizontal pass then vertical pass, or vertical
//     first when the height loses more than twice the pixels the width does, as Pillow 13 orders them),
//   * centre crop with Python // offsets (zero padding first when the image is smaller than the crop),
//   * rescale as float64 (pixel * rescale_factor) cast to float32, then normalize in float32: (x - mean) / std.
//
// Input images are packed RGB8 (HWC). Decoding files and converting other modes to RGB (vlexport composites
// alpha onto white) is the caller's job.
//
// Tokenization is out of scope: C++ apps tokenize with onnxruntime-genai's tokenizer (the bundle's
// tokenizer.json). What this library does is the step LlavaProcessor performs *before* tokenizing: each image
// placeholder in the prompt becomes num_image_tokens placeholders (see expand_image_tokens).
//
// Bit exactness: the resize uses double-precision filter weights exactly as Pillow's C code does. Build with
// floating-point contraction disabled (-ffp-contract=off, as cpp/CMakeLists.txt does) so that no fused
// multiply-add changes a weight; a Pillow build compiled with FMA contraction (possible on some non-x86 wheels)
// could differ in rare rounding ties.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace vlexport {

// PIL resampling codes (PIL.Image.Resampling).
enum Resample : int { RESAMPLE_BILINEAR = 2, RESAMPLE_BICUBIC = 3 };

// Mirrors vlexport.preprocess.ImageSpec (do_convert_rgb is implied: the input is RGB already).
// Defaults are those of ImageSpec.from_processor_config for an empty config (CLIP 224).
struct ImageSpec {
    int shortest_edge = 224;  // 0: resize to exactly height x width instead
    int height = 0;
    int width = 0;
    int crop_height = 224;
    int crop_width = 224;
    int resample = RESAMPLE_BICUBIC;  // PIL code: 3 = BICUBIC, 2 = BILINEAR (others are rejected)
    double rescale_factor = 1.0 / 255.0;
    // float32, as numpy casts them. To match Python exactly, convert from the double value (static_cast<float>),
    // not by parsing the decimal text straight to float.
    float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    bool do_resize = true;
    bool do_center_crop = true;
    bool do_rescale = true;
    bool do_normalize = true;
};

// Every error (bad arguments, unsupported resample, malformed JSON) is reported with this exception.
struct PreprocessError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The size preprocess() resizes a width x height image to (before cropping), as vlexport computes it.
void resize_target(int width, int height, const ImageSpec& spec, int* out_width, int* out_height);

// Pillow's Image.resize((out_width, out_height), resample) for an RGB8 image; returns packed RGB8 (HWC).
// Bit-identical to Pillow for resample 2 (BILINEAR) and 3 (BICUBIC).
std::vector<uint8_t> resize_rgb8(const uint8_t* rgb, int width, int height, int out_width, int out_height,
                                 int resample);

// vlexport.preprocess.preprocess_image for an RGB image: packed RGB8 (HWC) in, float32 CHW [3, out_h, out_w] out.
std::vector<float> preprocess(const uint8_t* rgb, int width, int height, const ImageSpec& spec, int* out_h,
                              int* out_w);

// LlavaProcessor's prompt expansion (Python: text.replace(image_token, image_token * num_image_tokens)):
// every non-overlapping occurrence of image_token, left to right, becomes num_image_tokens copies of it
// (none when num_image_tokens <= 0). An empty image_token leaves the text unchanged. Strings are UTF-8 bytes.
// Tokenizing the result is left to onnxruntime-genai's tokenizer.
std::string expand_image_tokens(const std::string& text, const std::string& image_token, int num_image_tokens);

// ImageSpec.from_processor_config: the text of processor_config.json / preprocessor_config.json (fields read from
// its "image_processor" object when present, else from the top level; missing fields take the defaults above).
ImageSpec image_spec_from_processor_config(const std::string& json_text);

// The spec stored in a vlexport bundle's manifest.json ("preprocessing" -> "image").
ImageSpec image_spec_from_manifest(const std::string& json_text);

// -- LLaVA-NeXT / LLaVA-OneVision any-resolution ----------------------------------------------------------------------
// Matches vlexport.anyres (Python), which matches transformers' LlavaNextImageProcessorPil /
// LlavaOnevisionImageProcessorPil and the models' pack_image_features: best-fit pinpoint, aspect-keeping resize and
// centred zero padding to it, tile x tile crops row-major after the global view (the whole image resized to the
// base size), each view then through preprocess() above.

using Resolution = std::pair<int, int>;  // (height, width)

// Mirrors vlexport.anyres.AnyResSpec.
struct AnyResSpec {
    bool onevision = false;
    ImageSpec tile_spec;                   // the per-view resize / crop / rescale / normalise
    std::vector<Resolution> grid_pinpoints;  // image_grid_pinpoints
    int tile = 336;                        // side of the crops the padded image is cut into
    int base_height = 336, base_width = 336;  // the global view's size
};

// Mirrors vlexport.anyres.AnyResGeometry: the model side (config.json).
struct AnyResGeometry {
    bool onevision = false;
    std::vector<Resolution> grid_pinpoints;
    int tile = 336;             // vision_config.image_size
    int patch = 14;             // vision_config.patch_size
    int max_num_patches = 0;    // OneVision's anyres_max_N; 0: no shrinking (LLaVA-NeXT)
    int base_extra = 0;
    bool newline = true;
    int side() const { return tile / patch; }
};

// transformers' select_best_resolution for an image of height x width.
Resolution select_best_resolution(int height, int width, const std::vector<Resolution>& pinpoints);

// The views the vision part runs on: the global view then the tiles, float32 [num_tiles, 3, tile_h, tile_w].
std::vector<float> preprocess_anyres(const uint8_t* rgb, int width, int height, const AnyResSpec& spec,
                                     int* num_tiles, int* tile_h, int* tile_w);

// image_size_to_num_patches: the views preprocess_anyres returns for a height x width image (global view included).
int anyres_num_tiles(int height, int width, const AnyResGeometry& geometry);

// (rows, cols) of the unpadded (for OneVision, shrunk) feature grid; one newline ends each row.
Resolution anyres_packed_grid(int height, int width, const AnyResGeometry& geometry);

// The image placeholders an image of height x width takes: what the processor writes, what the model packs, and
// what expand_image_tokens should be given.
int anyres_num_image_tokens(int height, int width, const AnyResGeometry& geometry);

// vlexport.anyres.pack_plan: the packing of the vision part's tile features into the image placeholders, as a
// gather. Row t of the packed sequence is sum_k weight[4t + k] * table[index[4t + k]], where table is the tile
// features flattened to [num_tiles * side^2, D] with the image_newline vector appended as its last row. LLaVA-NeXT
// rows are copies (weights 1, 0, 0, 0); OneVision's anyres_max shrink is bilinear. num_tiles <= 0: from the size;
// multi_image: OneVision's one-view path. The vectors hold 4 * anyres_num_image_tokens(...) entries.
void anyres_pack_plan(int height, int width, const AnyResGeometry& geometry, int num_tiles, bool multi_image,
                      std::vector<int64_t>* index, std::vector<float>* weight);

// From processor_config.json / preprocessor_config.json ("image_processor" object when present, else top level).
AnyResSpec anyres_spec_from_processor_config(const std::string& json_text);

// From a llava_next / llava_onevision config.json.
AnyResGeometry anyres_geometry_from_config(const std::string& json_text);

}  // namespace vlexport
