// Answer a question about an image with a vlexport bundle, through onnxruntime-genai's C API.
//
//   vlexport_genai BUNDLE IMAGE.ppm "question" [max_new_tokens]
//
// The bundle opens as an ORT-GenAI model as it is (vlexport writes genai_config.json). The image is preprocessed
// by vlexport's C++ code, which matches the base's Hugging Face processor bit for bit (ORT-GenAI's own pipeline
// squashes non-square photos), and fed as named tensors, as the ORT-GenAI notes in the README describe:
//   input_ids int32 [1, S]  (the image placeholder expanded to num_image_tokens copies, BOS first)
//   pixel_values float32 [1, 3, H, W]
//   num_image_tokens int64 [1]
// The image is a binary PPM (P6) so that the example needs no image library: `convert photo.jpg photo.ppm`.
// The prompt uses LLaVA-1.5's format ("USER: <image>\n... ASSISTANT:"); render the bundle's chat_template.jinja
// instead if your base uses another one.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ort_genai_c.h"
#include "vlexport_preprocess.h"

namespace {

void check(OgaResult* result, const char* what) {
  if (result != nullptr) {
    std::string message = OgaResultGetError(result);
    OgaDestroyResult(result);
    throw std::runtime_error(std::string(what) + ": " + message);
  }
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// One integer field of manifest.json ("num_image_tokens": 576).
long json_int(const std::string& json, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\"\\s*:\\s*(-?[0-9]+)")))
    throw std::runtime_error("manifest.json has no integer '" + key + "'");
  return std::stol(m[1]);
}

std::string json_string(const std::string& json, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\"\\s*:\\s*\"([^\"]*)\"")))
    throw std::runtime_error("manifest.json has no string '" + key + "'");
  return m[1];
}

// Binary PPM (P6, maxval 255) -> packed RGB8.
std::vector<uint8_t> read_ppm(const std::string& path, int* width, int* height) {
  std::ifstream in(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  in >> magic >> *width >> *height >> maxval;
  in.get();
  if (!in || magic != "P6" || maxval != 255) throw std::runtime_error(path + " is not a binary 8-bit PPM (P6)");
  std::vector<uint8_t> rgb(static_cast<size_t>(*width) * *height * 3);
  in.read(reinterpret_cast<char*>(rgb.data()), static_cast<std::streamsize>(rgb.size()));
  if (!in) throw std::runtime_error(path + " is truncated");
  return rgb;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " BUNDLE IMAGE.ppm \"question\" [max_new_tokens]\n";
    return 2;
  }
  const std::string bundle = argv[1];
  const int max_new_tokens = argc > 4 ? std::stoi(argv[4]) : 32;
  try {
    const std::string manifest = read_file(bundle + "/manifest.json");
    const int num_image_tokens = static_cast<int>(json_int(manifest, "num_image_tokens"));
    const std::string image_token = json_string(manifest, "image_token");

    // Pixels: exactly the Hugging Face CLIP processor's, from the bundle's own preprocessing record.
    int width = 0, height = 0, out_h = 0, out_w = 0;
    std::vector<uint8_t> rgb = read_ppm(argv[2], &width, &height);
    vlexport::ImageSpec spec = vlexport::image_spec_from_manifest(manifest);
    std::vector<float> pixels = vlexport::preprocess(rgb.data(), width, height, spec, &out_h, &out_w);

    OgaModel* model = nullptr;
    check(OgaCreateModel(bundle.c_str(), &model), "open bundle");
    OgaTokenizer* tokenizer = nullptr;
    check(OgaCreateTokenizer(model, &tokenizer), "tokenizer");

    // Prompt ids: the placeholder expanded as LlavaProcessor does, then BOS first (ORT-GenAI's encoder may skip it).
    const std::string prompt = vlexport::expand_image_tokens(
        "USER: " + image_token + "\n" + argv[3] + " ASSISTANT:", image_token, num_image_tokens);
    OgaSequences* sequences = nullptr;
    check(OgaCreateSequences(&sequences), "sequences");
    check(OgaTokenizerEncode(tokenizer, prompt.c_str(), sequences), "encode");
    const int32_t* encoded = OgaSequencesGetSequenceData(sequences, 0);
    std::vector<int32_t> ids(encoded, encoded + OgaSequencesGetSequenceCount(sequences, 0));
    const int32_t bos = static_cast<int32_t>(json_int(read_file(bundle + "/genai_config.json"), "bos_token_id"));
    if (ids.empty() || ids.front() != bos) ids.insert(ids.begin(), bos);

    // Named tensors, fed in place of ORT-GenAI's own processor.
    int64_t ids_shape[2] = {1, static_cast<int64_t>(ids.size())};
    int64_t pixel_shape[4] = {1, 3, out_h, out_w};
    int64_t count_shape[1] = {1};
    int64_t image_tokens = num_image_tokens;
    OgaTensor *ids_tensor = nullptr, *pixel_tensor = nullptr, *count_tensor = nullptr;
    check(OgaCreateTensorFromBuffer(ids.data(), ids_shape, 2, OgaElementType_int32, &ids_tensor), "input_ids");
    check(OgaCreateTensorFromBuffer(pixels.data(), pixel_shape, 4, OgaElementType_float32, &pixel_tensor), "pixels");
    check(OgaCreateTensorFromBuffer(&image_tokens, count_shape, 1, OgaElementType_int64, &count_tensor), "count");
    OgaNamedTensors* inputs = nullptr;
    check(OgaCreateNamedTensors(&inputs), "named tensors");
    check(OgaNamedTensorsSet(inputs, "input_ids", ids_tensor), "set input_ids");
    check(OgaNamedTensorsSet(inputs, "pixel_values", pixel_tensor), "set pixel_values");
    check(OgaNamedTensorsSet(inputs, "num_image_tokens", count_tensor), "set num_image_tokens");

    OgaGeneratorParams* params = nullptr;
    check(OgaCreateGeneratorParams(model, &params), "generator params");
    check(OgaGeneratorParamsSetSearchNumber(params, "max_length", static_cast<double>(ids.size() + max_new_tokens)),
          "max_length");
    check(OgaGeneratorParamsSetSearchBool(params, "do_sample", false), "greedy");
    OgaGenerator* generator = nullptr;
    check(OgaCreateGenerator(model, params, &generator), "generator");
    check(OgaGenerator_SetInputs(generator, inputs), "set inputs");  // runs vision, embedding and the prefill

    OgaTokenizerStream* stream = nullptr;
    check(OgaCreateTokenizerStream(tokenizer, &stream), "tokenizer stream");
    while (!OgaGenerator_IsDone(generator)) {
      check(OgaGenerator_GenerateNextToken(generator), "next token");
      const int32_t* next = nullptr;
      size_t n = 0;
      check(OgaGenerator_GetNextTokens(generator, &next, &n), "get token");
      const char* piece = nullptr;
      check(OgaTokenizerStreamDecode(stream, next[0], &piece), "decode");
      std::cout << piece << std::flush;
    }
    std::cout << "\n";

    OgaDestroyTokenizerStream(stream);
    OgaDestroyGenerator(generator);
    OgaDestroyGeneratorParams(params);
    OgaDestroyNamedTensors(inputs);
    OgaDestroyTensor(count_tensor);
    OgaDestroyTensor(pixel_tensor);
    OgaDestroyTensor(ids_tensor);
    OgaDestroySequences(sequences);
    OgaDestroyTokenizer(tokenizer);
    OgaDestroyModel(model);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
