// See vlexport_preprocess.h. An independent implementation of the behaviour of Pillow's 8-bit resampling
// (libImaging/Resample.c) and of vlexport.preprocess; every numeric step is written out to match it exactly.
#include "vlexport_preprocess.h"

#include <algorithm>
#include <cmath>
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

std::vector<uint8_t> resize_rgb8(const uint8_t* rgb, int width, int height, int out_width, int out_height,
                                 int resample) {
    if (!rgb || width <= 0 || height <= 0) throw PreprocessError("resize: empty input image");
    if (out_width <= 0 || out_height <= 0) throw PreprocessError("resize: output size must be positive");
    // Validate the filter even when nothing needs resampling (Pillow rejects unknown filters first too).
    if (resample != RESAMPLE_BICUBIC && resample != RESAMPLE_BILINEAR) (void)axis_weights(1, 1, resample);

    const bool horizontal = out_width != width;
    const bool vertical = out_height != height;
    const AxisWeights ver = axis_weights(height, out_height, resample);
    // Rows of the source the vertical pass reads; the horizontal pass only produces those.
    const int row_first = ver.first[0];
    const int row_end = ver.first[out_height - 1] + ver.count[out_height - 1];

    const uint8_t* src = rgb;  // current image, `src_w` pixels wide, rows offset by `src_row0`
    int src_w = width, src_row0 = 0;
    std::vector<uint8_t> tmp;
    if (horizontal) {
        const AxisWeights hor = axis_weights(width, out_width, resample);
        tmp.resize(static_cast<size_t>(row_end - row_first) * out_width * 3);
        for (int y = row_first; y < row_end; ++y) {
            const uint8_t* line = rgb + static_cast<size_t>(y) * width * 3;
            uint8_t* dst = &tmp[static_cast<size_t>(y - row_first) * out_width * 3];
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
        src = tmp.data();
        src_w = out_width;
        src_row0 = row_first;
    }
    if (!vertical) {
        if (horizontal) return tmp;  // row_first..row_end is every row when the height is unchanged
        return std::vector<uint8_t>(rgb, rgb + static_cast<size_t>(width) * height * 3);
    }
    std::vector<uint8_t> out(static_cast<size_t>(out_height) * src_w * 3);
    const size_t row_bytes = static_cast<size_t>(src_w) * 3;
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

}  // namespace vlexport
