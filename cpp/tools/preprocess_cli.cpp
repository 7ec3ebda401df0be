// preprocess_cli: a thin command-line front end to vlexport_preprocess, used by tests/test_cpp_preprocess.py.
//
//   preprocess_cli preprocess [SPEC OPTIONS] IN.ppm OUT.f32   float32 CHW, little-endian; prints "H W"
//   preprocess_cli resize [SPEC OPTIONS] IN.ppm OUT.u8        the resize step only: uint8 HWC RGB; prints "H W"
//   preprocess_cli spec [SPEC OPTIONS]                        prints the resulting spec, one "key value" a line
//   preprocess_cli expand IN.txt OUT.txt IMAGE_TOKEN N         expand_image_tokens on the file's bytes
//   preprocess_cli anyres --config PROCESSOR.json [--model-config CONFIG.json] IN.ppm OUT.f32
//       LLaVA-NeXT / OneVision views, float32 [N, 3, H, W]; prints "N H W", then "tokens T" with --model-config
//   preprocess_cli tokens --model-config CONFIG.json H W [H W ...]
//       per image size: "tiles rows cols tokens" (views, packed grid, image placeholders), one line each
//   preprocess_cli plan --model-config CONFIG.json H W OUT.bin
//       anyres_pack_plan: T * 4 int64 indices then T * 4 float32 weights (little-endian); prints T
//
// SPEC OPTIONS (applied in order, on top of the CLIP-224 defaults):
//   --config processor_config.json | --manifest manifest.json
//   --shortest-edge N   --size H W   --crop H W   --resample N   --rescale-factor F
//   --mean R G B   --std R G B   --no-resize   --no-center-crop   --no-rescale   --no-normalize
// IN.ppm is a binary PPM (P6, maxval 255).
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <locale>
#include <sstream>
#include <string>
#include <vector>

#include "vlexport_preprocess.h"

using vlexport::ImageSpec;
using vlexport::PreprocessError;

namespace {

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw PreprocessError("cannot open '" + path + "'");
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const void* data, size_t size) {
    std::ofstream out(path, std::ios::binary);
    if (!out || !out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size)))
        throw PreprocessError("cannot write '" + path + "'");
}

std::vector<uint8_t> read_ppm(const std::string& path, int* width, int* height) {
    const std::string data = read_file(path);
    size_t pos = 0;
    auto next_token = [&]() {
        while (pos < data.size()) {  // whitespace and # comments between header fields
            if (data[pos] == '#') {
                while (pos < data.size() && data[pos] != '\n') ++pos;
            } else if (std::isspace(static_cast<unsigned char>(data[pos]))) {
                ++pos;
            } else {
                break;
            }
        }
        const size_t start = pos;
        while (pos < data.size() && !std::isspace(static_cast<unsigned char>(data[pos])) && data[pos] != '#') ++pos;
        return data.substr(start, pos - start);
    };
    if (next_token() != "P6") throw PreprocessError("'" + path + "' is not a binary PPM (P6)");
    const int w = std::atoi(next_token().c_str()), h = std::atoi(next_token().c_str());
    const int maxval = std::atoi(next_token().c_str());
    if (w <= 0 || h <= 0 || maxval != 255) throw PreprocessError("'" + path + "': need a positive size and maxval 255");
    ++pos;  // the single whitespace byte before the raster
    const size_t bytes = static_cast<size_t>(w) * h * 3;
    if (data.size() < pos + bytes) throw PreprocessError("'" + path + "' is truncated");
    *width = w;
    *height = h;
    return std::vector<uint8_t>(data.begin() + pos, data.begin() + pos + bytes);
}

double to_double(const char* s) {
    std::istringstream in(s);
    in.imbue(std::locale::classic());
    double v = 0;
    if (!(in >> v) || !(in >> std::ws).eof()) throw PreprocessError(std::string("not a number: '") + s + "'");
    return v;
}

int to_int(const char* s) {
    const double v = to_double(s);
    if (v != static_cast<int>(v)) throw PreprocessError(std::string("not an integer: '") + s + "'");
    return static_cast<int>(v);
}

// Parses SPEC OPTIONS from argv[i...]; the remaining arguments are returned.
std::vector<std::string> parse_spec(int argc, char** argv, int i, ImageSpec* spec) {
    std::vector<std::string> rest;
    auto need = [&](int n) {
        if (i + n >= argc) throw PreprocessError(std::string(argv[i]) + " needs " + std::to_string(n) + " value(s)");
    };
    for (; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--config") {
            need(1);
            *spec = vlexport::image_spec_from_processor_config(read_file(argv[++i]));
        } else if (a == "--manifest") {
            need(1);
            *spec = vlexport::image_spec_from_manifest(read_file(argv[++i]));
        } else if (a == "--shortest-edge") {
            need(1);
            spec->shortest_edge = to_int(argv[++i]);
        } else if (a == "--size") {
            need(2);
            spec->height = to_int(argv[++i]);
            spec->width = to_int(argv[++i]);
        } else if (a == "--crop") {
            need(2);
            spec->crop_height = to_int(argv[++i]);
            spec->crop_width = to_int(argv[++i]);
        } else if (a == "--resample") {
            need(1);
            spec->resample = to_int(argv[++i]);
        } else if (a == "--rescale-factor") {
            need(1);
            spec->rescale_factor = to_double(argv[++i]);
        } else if (a == "--mean" || a == "--std") {
            need(3);
            float* dst = a == "--mean" ? spec->mean : spec->std;
            for (int c = 0; c < 3; ++c) dst[c] = static_cast<float>(to_double(argv[++i]));  // via double, as numpy
        } else if (a == "--no-resize") {
            spec->do_resize = false;
        } else if (a == "--no-center-crop") {
            spec->do_center_crop = false;
        } else if (a == "--no-rescale") {
            spec->do_rescale = false;
        } else if (a == "--no-normalize") {
            spec->do_normalize = false;
        } else if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
            throw PreprocessError("unknown option " + a);
        } else {
            rest.push_back(a);
        }
    }
    return rest;
}

void put_le32(std::vector<uint8_t>& out, uint32_t v) {
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}

void write_f32(const std::string& path, const std::vector<float>& values) {
    std::vector<uint8_t> bytes;
    bytes.reserve(values.size() * 4);
    for (float f : values) {
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        put_le32(bytes, bits);
    }
    write_file(path, bytes.data(), bytes.size());
}

int run_anyres(const std::string& cmd, int argc, char** argv) {
    std::string config, model_config;
    std::vector<std::string> rest;
    for (int i = 2; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "--config" || a == "--model-config") && i + 1 < argc) {
            (a == "--config" ? config : model_config) = argv[++i];
        } else if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
            throw PreprocessError("unknown option " + a + " (or it needs a value)");
        } else {
            rest.push_back(a);
        }
    }
    if (cmd == "plan") {
        if (model_config.empty() || rest.size() != 3)
            throw PreprocessError("usage: preprocess_cli plan --model-config CONFIG.json H W OUT.bin");
        const vlexport::AnyResGeometry g = vlexport::anyres_geometry_from_config(read_file(model_config));
        std::vector<int64_t> index;
        std::vector<float> weight;
        vlexport::anyres_pack_plan(to_int(rest[0].c_str()), to_int(rest[1].c_str()), g, 0, false, &index, &weight);
        std::vector<uint8_t> bytes;  // index as little-endian int64, then weight as float32
        for (int64_t v : index) {
            put_le32(bytes, static_cast<uint32_t>(static_cast<uint64_t>(v)));
            put_le32(bytes, static_cast<uint32_t>(static_cast<uint64_t>(v) >> 32));
        }
        for (float f : weight) {
            uint32_t bits;
            std::memcpy(&bits, &f, 4);
            put_le32(bytes, bits);
        }
        write_file(rest[2], bytes.data(), bytes.size());
        std::printf("%zu\n", index.size() / 4);
        return 0;
    }
    if (cmd == "tokens") {
        if (model_config.empty() || rest.empty() || rest.size() % 2 != 0)
            throw PreprocessError("usage: preprocess_cli tokens --model-config CONFIG.json H W [H W ...]");
        const vlexport::AnyResGeometry g = vlexport::anyres_geometry_from_config(read_file(model_config));
        for (size_t i = 0; i < rest.size(); i += 2) {
            const int h = to_int(rest[i].c_str()), w = to_int(rest[i + 1].c_str());
            const vlexport::Resolution grid = vlexport::anyres_packed_grid(h, w, g);
            std::printf("%d %d %d %d\n", vlexport::anyres_num_tiles(h, w, g), grid.first, grid.second,
                        vlexport::anyres_num_image_tokens(h, w, g));
        }
        return 0;
    }
    if (config.empty() || rest.size() != 2)
        throw PreprocessError("usage: preprocess_cli anyres --config PROCESSOR.json [--model-config CONFIG.json] IN.ppm OUT.f32");
    const vlexport::AnyResSpec spec = vlexport::anyres_spec_from_processor_config(read_file(config));
    int w = 0, h = 0;
    const std::vector<uint8_t> rgb = read_ppm(rest[0], &w, &h);
    int n = 0, th = 0, tw = 0;
    write_f32(rest[1], vlexport::preprocess_anyres(rgb.data(), w, h, spec, &n, &th, &tw));
    std::printf("%d %d %d\n", n, th, tw);
    if (!model_config.empty()) {
        const vlexport::AnyResGeometry g = vlexport::anyres_geometry_from_config(read_file(model_config));
        std::printf("tokens %d\n", vlexport::anyres_num_image_tokens(h, w, g));
    }
    return 0;
}

int run(int argc, char** argv) {
    if (argc < 2)
        throw PreprocessError("usage: preprocess_cli preprocess|resize|spec|expand|anyres|tokens|plan ... (see the source)");
    const std::string cmd = argv[1];
    if (cmd == "expand") {
        if (argc != 6) throw PreprocessError("usage: preprocess_cli expand IN.txt OUT.txt IMAGE_TOKEN N");
        const std::string out = vlexport::expand_image_tokens(read_file(argv[2]), argv[4], to_int(argv[5]));
        write_file(argv[3], out.data(), out.size());
        return 0;
    }
    if (cmd == "anyres" || cmd == "tokens" || cmd == "plan") return run_anyres(cmd, argc, argv);
    ImageSpec spec;
    const std::vector<std::string> rest = parse_spec(argc, argv, 2, &spec);
    if (cmd == "spec") {
        if (!rest.empty()) throw PreprocessError("spec takes only options");
        std::printf("shortest_edge %d\nheight %d\nwidth %d\ncrop_height %d\ncrop_width %d\nresample %d\n",
                    spec.shortest_edge, spec.height, spec.width, spec.crop_height, spec.crop_width, spec.resample);
        std::printf("rescale_factor %.17g\n", spec.rescale_factor);
        std::printf("mean %.9g %.9g %.9g\n", spec.mean[0], spec.mean[1], spec.mean[2]);
        std::printf("std %.9g %.9g %.9g\n", spec.std[0], spec.std[1], spec.std[2]);
        std::printf("do_resize %d\ndo_center_crop %d\ndo_rescale %d\ndo_normalize %d\n", spec.do_resize,
                    spec.do_center_crop, spec.do_rescale, spec.do_normalize);
        return 0;
    }
    if ((cmd != "preprocess" && cmd != "resize") || rest.size() != 2)
        throw PreprocessError("usage: preprocess_cli preprocess|resize [SPEC OPTIONS] IN.ppm OUT");
    int w = 0, h = 0;
    const std::vector<uint8_t> rgb = read_ppm(rest[0], &w, &h);
    if (cmd == "resize") {
        int nw = w, nh = h;
        if (spec.do_resize) vlexport::resize_target(w, h, spec, &nw, &nh);
        const std::vector<uint8_t> out = vlexport::resize_rgb8(rgb.data(), w, h, nw, nh, spec.resample);
        write_file(rest[1], out.data(), out.size());
        std::printf("%d %d\n", nh, nw);
        return 0;
    }
    int oh = 0, ow = 0;
    const std::vector<float> out = vlexport::preprocess(rgb.data(), w, h, spec, &oh, &ow);
    std::vector<uint8_t> bytes;
    bytes.reserve(out.size() * 4);
    for (float f : out) {
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        put_le32(bytes, bits);
    }
    write_file(rest[1], bytes.data(), bytes.size());
    std::printf("%d %d\n", oh, ow);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "preprocess_cli: error: %s\n", e.what());
        return 2;
    }
}
