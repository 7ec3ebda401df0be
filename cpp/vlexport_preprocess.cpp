// See vlexport_preprocess.h. An independent implementation of the behaviour of Pillow's 8-bit resampling
// (libImaging/Resample.c) and of vlexport.preprocess; every numeric step is written out to match it exactly.
#include "vlexport_preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <locale>
#include <sstream>
#include <utility>

namespace vlexport {

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Resampling (Pillow semantics)

constexpr int kPrecisionBits = 32 - 8 - 2;  // fixed-point fraction bits Pillow uses for 8-bit images

double bilinear_weight(double x) {
    x = std::fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

// Keys' cubic with a = -0.5, evaluated in the same operation order as Pillow (no contraction allowed).
double bicubic_weight(double x) {
    const double a = -0.5;
    x = std::fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// Fixed-point weights of one axis: output i reads `count[i]` inputs starting at `first[i]`, weights at
// `weights[i * stride ...]`.
struct AxisWeights {
    int stride = 0;
    std::vector<int> first, count;
    std::vector<int32_t> weights;
};

AxisWeights axis_weights(int in_size, int out_size, int resample) {
    double (*filter)(double);
    double filter_support;
    if (resample == RESAMPLE_BICUBIC) {
        filter = bicubic_weight;
        filter_support = 2.0;
    } else if (resample == RESAMPLE_BILINEAR) {
        filter = bilinear_weight;
        filter_support = 1.0;
    } else {
        throw PreprocessError("unsupported resample " + std::to_string(resample) +
                              " (supported: 2 = BILINEAR, 3 = BICUBIC)");
    }
    const double scale = static_cast<double>(in_size) / out_size;
    const double filterscale = std::max(scale, 1.0);
    const double support = filter_support * filterscale;
    const double inv_filterscale = 1.0 / filterscale;  // Pillow multiplies by the reciprocal, it does not divide

    AxisWeights aw;
    aw.stride = static_cast<int>(std::ceil(support)) * 2 + 1;
    aw.first.resize(out_size);
    aw.count.resize(out_size);
    aw.weights.assign(static_cast<size_t>(out_size) * aw.stride, 0);
    std::vector<double> w(aw.stride);
    for (int i = 0; i < out_size; ++i) {
        const double center = (i + 0.5) * scale;
        // int() truncation toward zero, then clamping, exactly as Pillow "rounds" the window bounds.
        int lo = static_cast<int>(center - support + 0.5);
        if (lo < 0) lo = 0;
        int hi = static_cast<int>(center + support + 0.5);
        if (hi > in_size) hi = in_size;
        const int n = hi - lo;
        double total = 0.0;
        for (int j = 0; j < n; ++j) {
            const int pos = j + lo;
            w[j] = filter((pos - center + 0.5) * inv_filterscale);
            total += w[j];
        }
        int32_t* out = &aw.weights[static_cast<size_t>(i) * aw.stride];
        for (int j = 0; j < n; ++j) {
            const double k = total != 0.0 ? w[j] / total : w[j];
            const double scaled = k * (1 << kPrecisionBits);
            // Round half away from zero, then truncate: (int)(k*2^22 -/+ 0.5).
            out[j] = static_cast<int32_t>(k < 0 ? -0.5 + scaled : 0.5 + scaled);
        }
        aw.first[i] = lo;
        aw.count[i] = n;
    }
    return aw;
}

inline uint8_t clip8(int64_t acc) {
    const int64_t v = acc >> kPrecisionBits;  // arithmetic shift: floor
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

int floor_div2(int v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }
int ceil_div2(int v) { return v >= 0 ? (v + 1) / 2 : -((-v) / 2); }

// ---------------------------------------------------------------------------------------------------------------
// A minimal JSON reader, enough for processor_config.json and manifest.json.

struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool boolean = false;
    double number = 0.0;
    std::string text;
    std::vector<Json> items;
    std::vector<std::pair<std::string, Json>> members;

    const Json* find(const std::string& key) const {
        const Json* hit = nullptr;  // the last duplicate wins, as in Python's json
        for (const auto& m : members)
            if (m.first == key) hit = &m.second;
        return hit;
    }
};

double parse_double(const std::string& s, const std::string& what) {
    std::istringstream in(s);
    in.imbue(std::locale::classic());
    double v = 0.0;
    in >> v;
    if (in.fail() || !(in >> std::ws).eof()) throw PreprocessError("bad number for " + what + ": '" + s + "'");
    return v;
}

class JsonReader {
public:
    explicit JsonReader(const std::string& s) : s_(s) {}

    Json document() {
        Json v = value();
        skip_ws();
        if (pos_ != s_.size()) fail("trailing characters");
        return v;
    }

private:
    const std::string& s_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& why) const {
        throw PreprocessError("invalid JSON at byte " + std::to_string(pos_) + ": " + why);
    }
    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }
    bool consume(const char* lit) {
        const size_t n = std::char_traits<char>::length(lit);
        if (s_.compare(pos_, n, lit) != 0) return false;
        pos_ += n;
        return true;
    }
    Json value() {
        skip_ws();
        if (pos_ >= s_.size()) fail("unexpected end");
        Json v;
        const char c = s_[pos_];
        if (c == '{') {
            v.kind = Json::Object;
            ++pos_;
            skip_ws();
            if (consume("}")) return v;
            do {
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a key");
                std::string key = string();
                skip_ws();
                if (!consume(":")) fail("expected ':'");
                v.members.emplace_back(std::move(key), value());
                skip_ws();
            } while (consume(","));
            if (!consume("}")) fail("expected '}'");
        } else if (c == '[') {
            v.kind = Json::Array;
            ++pos_;
            skip_ws();
            if (consume("]")) return v;
            do {
                v.items.push_back(value());
                skip_ws();
            } while (consume(","));
            if (!consume("]")) fail("expected ']'");
        } else if (c == '"') {
            v.kind = Json::String;
            v.text = string();
        } else if (consume("true")) {
            v.kind = Json::Bool;
            v.boolean = true;
        } else if (consume("false")) {
            v.kind = Json::Bool;
        } else if (consume("null")) {
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            const size_t start = pos_;
            while (pos_ < s_.size() && std::string("+-.eE0123456789").find(s_[pos_]) != std::string::npos) ++pos_;
            v.kind = Json::Number;
            v.number = parse_double(s_.substr(start, pos_ - start), "JSON value");
        } else {
            fail("unexpected character");
        }
        return v;
    }
    unsigned hex4() {
        if (pos_ + 4 > s_.size()) fail("short \\u escape");
        unsigned cp = 0;
        for (int i = 0; i < 4; ++i) {
            const char h = s_[pos_++];
            cp <<= 4;
            if (h >= '0' && h <= '9') cp |= h - '0';
            else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
            else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
            else fail("bad \\u escape");
        }
        return cp;
    }
    std::string string() {
        ++pos_;  // opening quote
        std::string out;
        while (true) {
            if (pos_ >= s_.size()) fail("unterminated string");
            const char c = s_[pos_++];
            if (c == '"') return out;
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) fail("unterminated escape");
            const char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && consume("\\u")) {
                        const unsigned lo = hex4();
                        if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        else fail("bad surrogate pair");
                    }
                    if (cp < 0x80) {
                        out += static_cast<char>(cp);
                    } else if (cp < 0x800) {
                        out += static_cast<char>(0xC0 | (cp >> 6));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else if (cp < 0x10000) {
                        out += static_cast<char>(0xE0 | (cp >> 12));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else {
                        out += static_cast<char>(0xF0 | (cp >> 18));
                        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    }
                    break;
                }
                default: fail("bad escape");
            }
        }
    }
};

const Json& require_object(const Json& v, const std::string& what) {
    if (v.kind != Json::Object) throw PreprocessError(what + " must be a JSON object");
    return v;
}

int as_int(const Json& v, const std::string& what) {
    if (v.kind == Json::Null) return 0;  // Python None: "not set"
    if (v.kind != Json::Number || v.number != std::floor(v.number) || std::fabs(v.number) > 1e9)
        throw PreprocessError(what + " must be an integer");
    return static_cast<int>(v.number);
}

bool as_bool(const Json& v, const std::string& what) {
    if (v.kind == Json::Null) return false;  // None is falsy
    if (v.kind == Json::Bool) return v.boolean;
    if (v.kind == Json::Number) return v.number != 0.0;
    throw PreprocessError(what + " must be a boolean");
}

void as_triple(const Json& v, float out[3], const std::string& what) {
    if (v.kind != Json::Array || v.items.size() != 3) throw PreprocessError(what + " must be a list of 3 numbers");
    for (int c = 0; c < 3; ++c) {
        if (v.items[c].kind != Json::Number) throw PreprocessError(what + " must be a list of 3 numbers");
        out[c] = static_cast<float>(v.items[c].number);  // double -> float32, as numpy does
    }
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------------

void resize_target(int width, int height, const ImageSpec& spec, int* out_width, int* out_height) {
    if (width <= 0 || height <= 0) throw PreprocessError("image size must be positive");
    if (spec.shortest_edge > 0) {
        const bool portrait = width <= height;
        const int short_side = portrait ? width : height;
        const int long_side = portrait ? height : width;
        // Python: int(shortest_edge * long / short): exact product, correctly rounded true division, truncation.
        const double ratio = static_cast<double>(static_cast<int64_t>(spec.shortest_edge) * long_side) / short_side;
        const int new_long = static_cast<int>(ratio);
        *out_width = portrait ? spec.shortest_edge : new_long;
        *out_height = portrait ? new_long : spec.shortest_edge;
    } else {
        *out_width = spec.width;
        *out_height = spec.height;
    }
    if (*out_width <= 0 || *out_height <= 0)
        throw PreprocessError("resize target must be positive (set shortest_edge, or height and width)");
}

namespace {

// Pillow's horizontal pass over rows [row_first, row_end) of a width-wide RGB8 image -> out_width-wide rows.
std::vector<uint8_t> horizontal_pass(const uint8_t* rgb, int width, int row_first, int row_end, int out_width,
                                     const AxisWeights& hor) {
    std::vector<uint8_t> out(static_cast<size_t>(row_end - row_first) * out_width * 3);
    for (int y = row_first; y < row_end; ++y) {
        const uint8_t* line = rgb + static_cast<size_t>(y) * width * 3;
        uint8_t* dst = &out[static_cast<size_t>(y - row_first) * out_width * 3];
        for (int x = 0; x < out_width; ++x) {
            const int32_t* k = &hor.weights[static_cast<size_t>(x) * hor.stride];
            const uint8_t* p = line + static_cast<size_t>(hor.first[x]) * 3;
            int64_t a0 = 1 << (kPrecisionBits - 1), a1 = a0, a2 = a0;
            for (int j = 0; j < hor.count[x]; ++j, p += 3) {
                a0 += static_cast<int64_t>(p[0]) * k[j];
                a1 += static_cast<int64_t>(p[1]) * k[j];
                a2 += static_cast<int64_t>(p[2]) * k[j];
            }
            dst[x * 3 + 0] = clip8(a0);
            dst[x * 3 + 1] = clip8(a1);
            dst[x * 3 + 2] = clip8(a2);
        }
    }
    return out;
}

// Pillow's vertical pass: `src` holds rows src_row0.. of a width-wide RGB8 image -> out_height rows.
std::vector<uint8_t> vertical_pass(const uint8_t* src, int width, int src_row0, int out_height,
                                   const AxisWeights& ver) {
    const size_t row_bytes = static_cast<size_t>(width) * 3;
    std::vector<uint8_t> out(static_cast<size_t>(out_height) * row_bytes);
    std::vector<int64_t> acc(row_bytes);
    for (int y = 0; y < out_height; ++y) {
        const int32_t* k = &ver.weights[static_cast<size_t>(y) * ver.stride];
        std::fill(acc.begin(), acc.end(), int64_t(1) << (kPrecisionBits - 1));
        for (int j = 0; j < ver.count[y]; ++j) {
            const uint8_t* line = src + static_cast<size_t>(ver.first[y] + j - src_row0) * row_bytes;
            const int64_t kj = k[j];
            for (size_t i = 0; i < row_bytes; ++i) acc[i] += line[i] * kj;
        }
        uint8_t* dst = &out[static_cast<size_t>(y) * row_bytes];
        for (size_t i = 0; i < row_bytes; ++i) dst[i] = clip8(acc[i]);
    }
    return out;
}

}  // namespace

std::vector<uint8_t> resize_rgb8(const uint8_t* rgb, int width, int height, int out_width, int out_height,
                                 int resample) {
    if (!rgb || width <= 0 || height <= 0) throw PreprocessError("resize: empty input image");
    if (out_width <= 0 || out_height <= 0) throw PreprocessError("resize: output size must be positive");
    // Validate the filter even when nothing needs resampling (Pillow rejects unknown filters first too).
    if (resample != RESAMPLE_BICUBIC && resample != RESAMPLE_BILINEAR) (void)axis_weights(1, 1, resample);

    const bool horizontal = out_width != width;
    const bool vertical = out_height != height;
    if (!horizontal && !vertical) return std::vector<uint8_t>(rgb, rgb + static_cast<size_t>(width) * height * 3);
    const AxisWeights ver = axis_weights(height, out_height, resample);
    if (!horizontal) return vertical_pass(rgb, width, 0, out_height, ver);
    const AxisWeights hor = axis_weights(width, out_width, resample);
    if (!vertical) return horizontal_pass(rgb, width, 0, height, out_width, hor);
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height loses more than twice
    // as many pixels as the width: (height - out_height) > 2 * (width - out_width). Each pass rounds to uint8, so
    // the order changes the result. Measured against Pillow 13.0.0 on 398 random size pairs, ties included.
    if (out_height < height && static_cast<int64_t>(height) - out_height > 2 * (static_cast<int64_t>(width) - out_width)) {
        const std::vector<uint8_t> tmp = vertical_pass(rgb, width, 0, out_height, ver);
        return horizontal_pass(tmp.data(), width, 0, out_height, out_width, hor);
    }
    // Horizontal first, on the source rows the vertical pass reads only.
    const int row_first = ver.first[0];
    const int row_end = ver.first[out_height - 1] + ver.count[out_height - 1];
    const std::vector<uint8_t> tmp = horizontal_pass(rgb, width, row_first, row_end, out_width, hor);
    return vertical_pass(tmp.data(), out_width, row_first, out_height, ver);
}

std::vector<float> preprocess(const uint8_t* rgb, int width, int height, const ImageSpec& spec, int* out_h,
                              int* out_w) {
    if (!rgb || width <= 0 || height <= 0) throw PreprocessError("preprocess: empty input image");
    std::vector<uint8_t> resized;
    const uint8_t* img = rgb;
    int w = width, h = height;
    if (spec.do_resize) {
        int nw = 0, nh = 0;
        resize_target(width, height, spec, &nw, &nh);
        resized = resize_rgb8(rgb, width, height, nw, nh, spec.resample);
        img = resized.data();
        w = nw;
        h = nh;
    }

    // Window of the (possibly zero-padded) image that is kept: rows [r0, r1), cols [c0, c1) of the padded image,
    // whose pixel (y, x) is img(y - pad_top, x - pad_left) or 0 outside it. Same arithmetic as _center_crop.
    int pad_top = 0, pad_left = 0, r0 = 0, r1 = h, c0 = 0, c1 = w;
    if (spec.do_center_crop) {
        const int ch = spec.crop_height, cw = spec.crop_width;
        if (ch <= 0 || cw <= 0) throw PreprocessError("crop size must be positive");
        int top = floor_div2(h - ch), left = floor_div2(w - cw);
        if (top >= 0 && left >= 0) {
            r0 = top, r1 = top + ch, c0 = left, c1 = left + cw;
        } else {
            const int nh = std::max(ch, h), nw = std::max(cw, w);
            pad_top = ceil_div2(nh - h);
            pad_left = ceil_div2(nw - w);
            top += pad_top;
            left += pad_left;
            r0 = std::max(0, top), r1 = std::min(nh, top + ch);
            c0 = std::max(0, left), c1 = std::min(nw, left + cw);
        }
    }
    const int oh = r1 - r0, ow = c1 - c0;
    std::vector<float> out(static_cast<size_t>(3) * oh * ow);
    for (int c = 0; c < 3; ++c) {
        // The value every pixel v of this channel becomes, computed once per byte value (same arithmetic).
        float lut[256];
        for (int v = 0; v < 256; ++v) {
            float x = spec.do_rescale ? static_cast<float>(static_cast<double>(v) * spec.rescale_factor)
                                      : static_cast<float>(v);
            if (spec.do_normalize) x = (x - spec.mean[c]) / spec.std[c];
            lut[v] = x;
        }
        float* plane = &out[static_cast<size_t>(c) * oh * ow];
        for (int y = 0; y < oh; ++y) {
            const int sy = r0 + y - pad_top;
            for (int x = 0; x < ow; ++x) {
                const int sx = c0 + x - pad_left;
                const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
                const uint8_t v = inside ? img[(static_cast<size_t>(sy) * w + sx) * 3 + c] : 0;
                plane[static_cast<size_t>(y) * ow + x] = lut[v];
            }
        }
    }
    *out_h = oh;
    *out_w = ow;
    return out;
}

std::string expand_image_tokens(const std::string& text, const std::string& image_token, int num_image_tokens) {
    if (image_token.empty()) return text;  // Python: text.replace("", "" * n) == text
    std::string repeated;
    for (int i = 0; i < num_image_tokens; ++i) repeated += image_token;
    std::string out;
    size_t pos = 0;
    while (true) {
        const size_t hit = text.find(image_token, pos);
        if (hit == std::string::npos) break;
        out.append(text, pos, hit - pos);
        out += repeated;
        pos = hit + image_token.size();
    }
    out.append(text, pos, std::string::npos);
    return out;
}

ImageSpec image_spec_from_processor_config(const std::string& json_text) {
    const Json doc = JsonReader(json_text).document();
    require_object(doc, "processor config");
    const Json* nested = doc.find("image_processor");
    const Json& ip = require_object(nested ? *nested : doc, "image_processor");

    ImageSpec spec;  // defaults == from_processor_config's
    if (const Json* size = ip.find("size")) {
        require_object(*size, "size");
        const Json* se = size->find("shortest_edge");
        const Json* h = size->find("height");
        const Json* w = size->find("width");
        spec.shortest_edge = se ? as_int(*se, "size.shortest_edge") : 0;
        spec.height = h ? as_int(*h, "size.height") : 0;
        spec.width = w ? as_int(*w, "size.width") : 0;
    }
    if (const Json* crop = ip.find("crop_size")) {
        if (crop->kind == Json::Number) {
            spec.crop_height = spec.crop_width = as_int(*crop, "crop_size");
        } else {
            require_object(*crop, "crop_size");
            const Json* h = crop->find("height");
            const Json* w = crop->find("width");
            if (!h || !w) throw PreprocessError("crop_size needs height and width");
            spec.crop_height = as_int(*h, "crop_size.height");
            spec.crop_width = as_int(*w, "crop_size.width");
        }
    }
    if (const Json* v = ip.find("resample")) spec.resample = as_int(*v, "resample");
    if (const Json* v = ip.find("rescale_factor")) {
        if (v->kind != Json::Number) throw PreprocessError("rescale_factor must be a number");
        spec.rescale_factor = v->number;
    }
    if (const Json* v = ip.find("image_mean")) as_triple(*v, spec.mean, "image_mean");
    if (const Json* v = ip.find("image_std")) as_triple(*v, spec.std, "image_std");
    if (const Json* v = ip.find("do_resize")) spec.do_resize = as_bool(*v, "do_resize");
    if (const Json* v = ip.find("do_center_crop")) spec.do_center_crop = as_bool(*v, "do_center_crop");
    if (const Json* v = ip.find("do_rescale")) spec.do_rescale = as_bool(*v, "do_rescale");
    if (const Json* v = ip.find("do_normalize")) spec.do_normalize = as_bool(*v, "do_normalize");
    return spec;
}

ImageSpec image_spec_from_manifest(const std::string& json_text) {
    const Json doc = JsonReader(json_text).document();
    const Json* pre = require_object(doc, "manifest").find("preprocessing");
    const Json* image = pre ? require_object(*pre, "preprocessing").find("image") : nullptr;
    if (!image) throw PreprocessError("manifest has no preprocessing.image");
    require_object(*image, "preprocessing.image");
    auto field = [&](const char* key) -> const Json& {
        const Json* v = image->find(key);
        if (!v) throw PreprocessError(std::string("manifest preprocessing.image has no ") + key);
        return *v;
    };
    ImageSpec spec;
    spec.shortest_edge = as_int(field("shortest_edge"), "shortest_edge");
    spec.height = as_int(field("height"), "height");
    spec.width = as_int(field("width"), "width");
    spec.crop_height = as_int(field("crop_height"), "crop_height");
    spec.crop_width = as_int(field("crop_width"), "crop_width");
    spec.resample = as_int(field("resample"), "resample");
    if (field("rescale_factor").kind != Json::Number) throw PreprocessError("rescale_factor must be a number");
    spec.rescale_factor = field("rescale_factor").number;
    as_triple(field("mean"), spec.mean, "mean");
    as_triple(field("std"), spec.std, "std");
    spec.do_resize = as_bool(field("do_resize"), "do_resize");
    spec.do_center_crop = as_bool(field("do_center_crop"), "do_center_crop");
    spec.do_rescale = as_bool(field("do_rescale"), "do_rescale");
    spec.do_normalize = as_bool(field("do_normalize"), "do_normalize");
    return spec;
}

// -------------------------------------------------------------------------------------------------------------------
// Any-resolution (LLaVA-NeXT / OneVision). Every formula follows vlexport/anyres.py, which follows transformers.

namespace {

// Python's int(round(x, 7)) for x >= 0: round to 7 decimals (correctly rounded, as printf is), then truncate.
int py_int_round7(double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.7f", x);
    return std::atoi(buf);
}

// Python's float floor division a // b (floatobject.c's float_floor_div), for the anyres_max shrink.
double py_floordiv(double vx, double wx) {
    double mod = std::fmod(vx, wx);
    double div = (vx - mod) / wx;
    if (mod != 0.0) {
        if ((wx < 0) != (mod < 0)) div -= 1.0;
    }
    if (div != 0.0) {
        double floordiv = std::floor(div);
        if (div - floordiv > 0.5) floordiv += 1.0;
        return floordiv;
    }
    return std::copysign(0.0, vx / wx);
}

Resolution patch_output_size(int height, int width, Resolution target) {
    const double scale_w = static_cast<double>(target.second) / width;
    const double scale_h = static_cast<double>(target.first) / height;
    if (scale_w < scale_h)
        return {std::min(static_cast<int>(std::ceil(height * scale_w)), target.first), target.second};
    return {target.first, std::min(static_cast<int>(std::ceil(width * scale_h)), target.second)};
}

// unpad_image's cut on a rows x cols feature grid: {top, bottom, left, right}.
void unpad_bounds(int rows, int cols, int height, int width, int out[4]) {
    const double original_aspect = static_cast<double>(width) / height;
    const double current_aspect = static_cast<double>(cols) / rows;
    if (original_aspect > current_aspect) {
        const int new_h = py_int_round7(height * (static_cast<double>(cols) / width));
        const int pad = floor_div2(rows - new_h);
        out[0] = pad, out[1] = rows - pad, out[2] = 0, out[3] = cols;
    } else {
        const int new_w = py_int_round7(width * (static_cast<double>(rows) / height));
        const int pad = floor_div2(cols - new_w);
        out[0] = 0, out[1] = rows, out[2] = pad, out[3] = cols - pad;
    }
}

std::vector<Resolution> as_pinpoints(const Json& v, const std::string& what) {
    if (v.kind != Json::Array || v.items.empty())
        throw PreprocessError(what + " must be a non-empty list of [height, width] pairs");
    std::vector<Resolution> out;
    for (const Json& p : v.items) {
        if (p.kind != Json::Array || p.items.size() != 2)
            throw PreprocessError(what + " must be a list of [height, width] pairs");
        const int h = as_int(p.items[0], what), w = as_int(p.items[1], what);
        if (h <= 0 || w <= 0) throw PreprocessError(what + " must hold positive sizes");
        out.emplace_back(h, w);
    }
    return out;
}

std::vector<Resolution> default_pinpoints(bool onevision) {
    if (!onevision) return {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};
    std::vector<Resolution> out;
    for (int i = 1; i <= 6; ++i)
        for (int j = 1; j <= 6; ++j) out.emplace_back(384 * i, 384 * j);
    return out;
}

const Json* find_set(const Json& obj, const char* key) {  // a member that is present and not null
    const Json* v = obj.find(key);
    return v && v->kind != Json::Null ? v : nullptr;
}

}  // namespace

Resolution select_best_resolution(int height, int width, const std::vector<Resolution>& pinpoints) {
    if (height <= 0 || width <= 0) throw PreprocessError("image size must be positive");
    bool found = false;
    Resolution best{0, 0};
    int64_t best_effective = 0;
    double best_wasted = std::numeric_limits<double>::infinity();
    for (const Resolution& p : pinpoints) {
        const double scale = std::min(static_cast<double>(p.second) / width, static_cast<double>(p.first) / height);
        const int64_t dw = static_cast<int64_t>(width * scale), dh = static_cast<int64_t>(height * scale);
        const int64_t effective = std::min(dw * dh, static_cast<int64_t>(width) * height);
        const double wasted = static_cast<double>(static_cast<int64_t>(p.first) * p.second - effective);
        if (effective > best_effective || (effective == best_effective && wasted < best_wasted)) {
            best = p, best_effective = effective, best_wasted = wasted, found = true;
        }
    }
    if (!found) throw PreprocessError("image_grid_pinpoints gives no resolution for this image");
    return best;
}

std::vector<float> preprocess_anyres(const uint8_t* rgb, int width, int height, const AnyResSpec& spec,
                                     int* num_tiles, int* tile_h, int* tile_w) {
    if (!rgb || width <= 0 || height <= 0) throw PreprocessError("preprocess_anyres: empty input image");
    if (spec.tile <= 0 || spec.base_height <= 0 || spec.base_width <= 0)
        throw PreprocessError("preprocess_anyres: tile and base sizes must be positive");
    const Resolution best = select_best_resolution(height, width, spec.grid_pinpoints);
    const Resolution fit = patch_output_size(height, width, best);
    const std::vector<uint8_t> fitted = resize_rgb8(rgb, width, height, fit.second, fit.first, spec.tile_spec.resample);
    // Centred zero padding, the odd pixel after (bottom / right), as _get_padding_size's divmod.
    const int top = (best.first - fit.first) / 2, left = (best.second - fit.second) / 2;
    std::vector<uint8_t> padded(static_cast<size_t>(best.first) * best.second * 3, 0);
    for (int y = 0; y < fit.first; ++y)
        std::copy_n(&fitted[static_cast<size_t>(y) * fit.second * 3], static_cast<size_t>(fit.second) * 3,
                    &padded[(static_cast<size_t>(y + top) * best.second + left) * 3]);

    std::vector<float> out;
    int n = 0, vh = 0, vw = 0;
    auto add_view = [&](const std::vector<uint8_t>& view, int w, int h) {
        int oh = 0, ow = 0;
        const std::vector<float> t = preprocess(view.data(), w, h, spec.tile_spec, &oh, &ow);
        if (n > 0 && (oh != vh || ow != vw)) throw PreprocessError("preprocess_anyres: views of different sizes");
        vh = oh, vw = ow, ++n;
        out.insert(out.end(), t.begin(), t.end());
    };
    add_view(resize_rgb8(rgb, width, height, spec.base_width, spec.base_height, spec.tile_spec.resample),
             spec.base_width, spec.base_height);
    const int t = spec.tile;
    for (int i = 0; i < best.first; i += t) {
        for (int j = 0; j < best.second; j += t) {
            const int th = std::min(t, best.first - i), tw = std::min(t, best.second - j);
            std::vector<uint8_t> view(static_cast<size_t>(th) * tw * 3);
            for (int y = 0; y < th; ++y)
                std::copy_n(&padded[(static_cast<size_t>(i + y) * best.second + j) * 3], static_cast<size_t>(tw) * 3,
                            &view[static_cast<size_t>(y) * tw * 3]);
            add_view(view, tw, th);
        }
    }
    *num_tiles = n;
    *tile_h = vh;
    *tile_w = vw;
    return out;
}

int anyres_num_tiles(int height, int width, const AnyResGeometry& g) {
    const Resolution best = select_best_resolution(height, width, g.grid_pinpoints);
    const int rows = (best.first + g.tile - 1) / g.tile, cols = (best.second + g.tile - 1) / g.tile;
    return rows * cols + 1;
}

Resolution anyres_packed_grid(int height, int width, const AnyResGeometry& g) {
    if (g.tile <= 0 || g.patch <= 0 || g.side() <= 0) throw PreprocessError("geometry: tile and patch must be positive");
    const Resolution best = select_best_resolution(height, width, g.grid_pinpoints);
    const int side = g.side();
    int b[4];
    unpad_bounds(best.first / g.tile * side, best.second / g.tile * side, height, width, b);
    int h = b[1] - b[0], w = b[3] - b[2];
    if (g.max_num_patches > 0) {
        const double ratio = std::sqrt(static_cast<double>(static_cast<int64_t>(h) * w) /
                                       static_cast<double>(static_cast<int64_t>(g.max_num_patches) * side * side));
        if (ratio > 1.1) {
            h = static_cast<int>(py_floordiv(h, ratio));
            w = static_cast<int>(py_floordiv(w, ratio));
        }
    }
    return {h, w};
}

int anyres_num_image_tokens(int height, int width, const AnyResGeometry& g) {
    const Resolution grid = anyres_packed_grid(height, width, g);
    return g.side() * g.side() + g.base_extra + grid.first * grid.second + (g.newline ? grid.first : 0);
}

void anyres_pack_plan(int height, int width, const AnyResGeometry& g, int num_tiles, bool multi_image,
                      std::vector<int64_t>* index, std::vector<float>* weight) {
    const int side = g.side();
    if (side <= 0) throw PreprocessError("geometry: tile and patch must be positive");
    const int n = multi_image ? 1 : (num_tiles > 0 ? num_tiles : anyres_num_tiles(height, width, g));
    const int64_t newline_row = static_cast<int64_t>(n) * side * side;
    index->clear();
    weight->clear();
    auto put = [&](int64_t a, int64_t b, int64_t c, int64_t d, double wa, double wb, double wc, double wd) {
        index->insert(index->end(), {a, b, c, d});
        weight->insert(weight->end(), {static_cast<float>(wa), static_cast<float>(wb), static_cast<float>(wc),
                                       static_cast<float>(wd)});
    };
    auto copy = [&](int64_t row) { put(row, row, row, row, 1.0, 0.0, 0.0, 0.0); };
    for (int i = 0; i < side * side; ++i) copy(i);  // the global view
    if (n == 1) {
        if (g.newline) copy(newline_row);
        return;
    }
    const Resolution best = select_best_resolution(height, width, g.grid_pinpoints);
    const int grid_cols = best.second / g.tile;
    int b[4];
    unpad_bounds(best.first / g.tile * side, grid_cols * side, height, width, b);
    const int h = b[1] - b[0], w = b[3] - b[2];
    // Row of the table holding feature (r, c) of the unpadded grid.
    auto src = [&](int r, int c) -> int64_t {
        const int fr = r + b[0], fc = c + b[2];
        return (1 + static_cast<int64_t>(fr / side) * grid_cols + fc / side) * side * side + (fr % side) * side +
               fc % side;
    };
    int out_h = h, out_w = w;
    bool shrink = false;
    if (g.max_num_patches > 0) {
        const double ratio = std::sqrt(static_cast<double>(static_cast<int64_t>(h) * w) /
                                       static_cast<double>(static_cast<int64_t>(g.max_num_patches) * side * side));
        if (ratio > 1.1) {
            shrink = true;
            out_h = static_cast<int>(py_floordiv(h, ratio));
            out_w = static_cast<int>(py_floordiv(w, ratio));
        }
    }
    // PyTorch's bilinear source index for float32 input (align_corners=False), in float32 arithmetic.
    auto axis = [](int n_in, int n_out, std::vector<int>* i0, std::vector<int>* i1, std::vector<double>* l0,
                   std::vector<double>* l1) {
        const float scale = static_cast<float>(n_in) / static_cast<float>(n_out);
        for (int i = 0; i < n_out; ++i) {
            float s = (static_cast<float>(i) + 0.5f) * scale - 0.5f;
            s = std::max(s, 0.0f);
            const int a = std::min(static_cast<int>(s), n_in - 1);
            const float lam = std::min(std::max(s - static_cast<float>(a), 0.0f), 1.0f);
            i0->push_back(a);
            i1->push_back(std::min(a + 1, n_in - 1));
            l1->push_back(static_cast<double>(lam));
            l0->push_back(1.0 - static_cast<double>(lam));
        }
    };
    std::vector<int> y0, y1, x0, x1;
    std::vector<double> hy0, hy1, wx0, wx1;
    if (shrink) {
        axis(h, out_h, &y0, &y1, &hy0, &hy1);
        axis(w, out_w, &x0, &x1, &wx0, &wx1);
    }
    for (int r = 0; r < out_h; ++r) {
        for (int c = 0; c < out_w; ++c) {
            if (!shrink) {
                copy(src(r, c));
            } else {
                put(src(y0[r], x0[c]), src(y0[r], x1[c]), src(y1[r], x0[c]), src(y1[r], x1[c]), hy0[r] * wx0[c],
                    hy0[r] * wx1[c], hy1[r] * wx0[c], hy1[r] * wx1[c]);
            }
        }
        if (g.newline) copy(newline_row);
    }
}

AnyResSpec anyres_spec_from_processor_config(const std::string& json_text) {
    const Json doc = JsonReader(json_text).document();
    require_object(doc, "processor config");
    const Json* nested = doc.find("image_processor");
    const Json& ip = require_object(nested ? *nested : doc, "image_processor");
    const Json* kind = ip.find("image_processor_type");
    const std::string type = kind && kind->kind == Json::String ? kind->text : "";
    AnyResSpec spec;
    if (type.find("Onevision") != std::string::npos) spec.onevision = true;
    else if (type.find("LlavaNext") == std::string::npos)
        throw PreprocessError("image_processor_type '" + type + "' is not LlavaNextImageProcessor or "
                              "LlavaOnevisionImageProcessor");
    // The per-view spec: ImageSpec's rules, with each family's defaults for size, crop and centre crop.
    ImageSpec& ts = spec.tile_spec;
    int se = spec.onevision ? 0 : 224, sh = spec.onevision ? 384 : 0, sw = sh;
    if (const Json* size = find_set(ip, "size")) {
        require_object(*size, "size");
        const Json* s = size->find("shortest_edge");
        const Json* h = size->find("height");
        const Json* w = size->find("width");
        se = s ? as_int(*s, "size.shortest_edge") : 0;
        sh = h ? as_int(*h, "size.height") : 0;
        sw = w ? as_int(*w, "size.width") : 0;
    }
    ts.shortest_edge = se, ts.height = sh, ts.width = sw;
    int ch = 0, cw = 0;
    const Json* crop = ip.find("crop_size");
    if (!crop && !spec.onevision) {
        ch = cw = 224;
    } else if (crop && crop->kind == Json::Number) {
        ch = cw = as_int(*crop, "crop_size");
    } else if (crop && crop->kind == Json::Object) {
        const Json* h = crop->find("height");
        const Json* w = crop->find("width");
        if (!h || !w) throw PreprocessError("crop_size needs height and width");
        ch = as_int(*h, "crop_size.height");
        cw = as_int(*w, "crop_size.width");
    } else if (crop && crop->kind != Json::Null) {
        throw PreprocessError("crop_size must be an object, a number or null");
    }
    spec.tile = ch > 0 ? ch : sh > 0 ? sh : se;
    if (sh > 0 && sw > 0) spec.base_height = sh, spec.base_width = sw;
    else spec.base_height = spec.base_width = se;
    ts.crop_height = ch > 0 ? ch : spec.tile;
    ts.crop_width = ch > 0 ? cw : spec.tile;
    ts.do_center_crop = !spec.onevision;
    if (const Json* v = ip.find("resample")) ts.resample = as_int(*v, "resample");
    if (const Json* v = ip.find("rescale_factor")) {
        if (v->kind != Json::Number) throw PreprocessError("rescale_factor must be a number");
        ts.rescale_factor = v->number;
    }
    if (const Json* v = ip.find("image_mean")) as_triple(*v, ts.mean, "image_mean");
    if (const Json* v = ip.find("image_std")) as_triple(*v, ts.std, "image_std");
    if (const Json* v = ip.find("do_resize")) ts.do_resize = as_bool(*v, "do_resize");
    if (const Json* v = ip.find("do_center_crop")) ts.do_center_crop = as_bool(*v, "do_center_crop");
    if (const Json* v = ip.find("do_rescale")) ts.do_rescale = as_bool(*v, "do_rescale");
    if (const Json* v = ip.find("do_normalize")) ts.do_normalize = as_bool(*v, "do_normalize");
    const Json* pins = find_set(ip, "image_grid_pinpoints");
    spec.grid_pinpoints = pins ? as_pinpoints(*pins, "image_grid_pinpoints") : default_pinpoints(spec.onevision);
    if (spec.tile <= 0) throw PreprocessError("processor config gives no tile size (crop_size or size)");
    return spec;
}

AnyResGeometry anyres_geometry_from_config(const std::string& json_text) {
    const Json doc = JsonReader(json_text).document();
    require_object(doc, "config.json");
    const Json* mt = doc.find("model_type");
    const std::string type = mt && mt->kind == Json::String ? mt->text : "";
    AnyResGeometry g;
    if (type == "llava_onevision") g.onevision = true;
    else if (type != "llava_next")
        throw PreprocessError("config.json has model_type '" + type + "': any-resolution geometry is for "
                              "'llava_next' and 'llava_onevision' models");
    g.tile = g.onevision ? 384 : 336;
    if (const Json* vision = find_set(doc, "vision_config")) {
        require_object(*vision, "vision_config");
        if (const Json* v = find_set(*vision, "image_size")) g.tile = as_int(*v, "vision_config.image_size");
        if (const Json* v = find_set(*vision, "patch_size")) g.patch = as_int(*v, "vision_config.patch_size");
    }
    const Json* pins = find_set(doc, "image_grid_pinpoints");
    g.grid_pinpoints = pins ? as_pinpoints(*pins, "image_grid_pinpoints") : default_pinpoints(g.onevision);
    if (g.onevision) {
        std::string ratio = "anyres_max_9";
        if (const Json* v = find_set(doc, "vision_aspect_ratio")) ratio = v->text;
        // transformers reads it with str.strip("anyres_max_"), a character set: the digits remain
        const std::string chars = "anyres_max_";
        size_t a = 0, b = ratio.size();
        while (a < b && chars.find(ratio[a]) != std::string::npos) ++a;
        while (b > a && chars.find(ratio[b - 1]) != std::string::npos) --b;
        const std::string digits = ratio.substr(a, b - a);
        if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
            throw PreprocessError("vision_aspect_ratio '" + ratio + "' is not of the form 'anyres_max_N'");
        g.max_num_patches = std::atoi(digits.c_str());
    }
    return g;
}

}  // namespace vlexport
