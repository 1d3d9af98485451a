// Thin shim over libvips. Its C API is variadic (optional arguments as name/value pairs ending in NULL),
// which Swift cannot call: each function here fixes one call's arguments. Imported only by
// Sources/Dataset/Image.swift.
#ifndef LORA_CVIPS_H
#define LORA_CVIPS_H
#include <vips/vips.h>

/// vips_init once; 0 on success. Thread concurrency per image is kept low: the data loader decodes many
/// images in parallel, so per-image worker threads would only oversubscribe the cores. The operation cache
/// is off: it is keyed by file name, so a file rewritten at the same path would come back stale.
static inline int lora_vips_init(int concurrency) {
    if (vips_init("lora-dist") != 0) return -1;
    vips_concurrency_set(concurrency);
    vips_cache_set_max(0);
    return 0;
}

/// Lazy open: reads the header only (pixels are decoded on demand), for width/height/orientation.
static inline VipsImage *lora_vips_open_header(const char *path) {
    return vips_image_new_from_file(path, NULL);
}

/// EXIF orientation 1...8, or 1 when absent.
static inline int lora_vips_orientation(VipsImage *image) {
    int n = 1;
    if (vips_image_get_typeof(image, VIPS_META_ORIENTATION) == 0) return 1;
    if (vips_image_get_int(image, VIPS_META_ORIENTATION, &n) != 0) { vips_error_clear(); return 1; }
    return n;
}

/// Decode with shrink-on-load, EXIF autorotation and a Lanczos3 resize to exactly width x height
/// (vips_thumbnail: JPEG/WebP shrink while decoding when the target is much smaller; the rest is vips_resize
/// with its default Lanczos3 kernel). Truncated or corrupt data is an error, not a grey-filled image.
static inline int lora_vips_thumbnail(const char *path, VipsImage **out, int width, int height) {
    return vips_thumbnail(path, out, width, "height", height, "size", VIPS_SIZE_FORCE,
                          "fail_on", VIPS_FAIL_ON_ERROR, NULL);
}

static inline int lora_vips_linear1(VipsImage *in, VipsImage **out, double a, double b) {
    return vips_linear1(in, out, a, b, NULL);
}
static inline int lora_vips_cast_uchar(VipsImage *in, VipsImage **out) {
    return vips_cast(in, out, VIPS_FORMAT_UCHAR, NULL);
}
/// Composite the alpha band over a constant background (same value in every band), alpha range 0...maxAlpha.
static inline int lora_vips_flatten(VipsImage *in, VipsImage **out, double background, double maxAlpha) {
    double bg[4] = {background, background, background, background};
    int n = in->Bands - 1;
    if (n < 1) n = 1;
    if (n > 4) n = 4;
    VipsArrayDouble *array = vips_array_double_new(bg, n);
    int r = vips_flatten(in, out, "background", array, "max_alpha", maxAlpha, NULL);
    vips_area_unref(VIPS_AREA(array));
    return r;
}
static inline int lora_vips_grey_to_rgb(VipsImage *in, VipsImage **out) {
    VipsImage *bands[3] = {in, in, in};
    return vips_bandjoin(bands, out, 3, NULL);
}
static inline int lora_vips_extract_area(VipsImage *in, VipsImage **out, int left, int top, int width, int height) {
    return vips_extract_area(in, out, left, top, width, height, NULL);
}
static inline int lora_vips_flip_horizontal(VipsImage *in, VipsImage **out) {
    return vips_flip(in, out, VIPS_DIRECTION_HORIZONTAL, NULL);
}
static inline int lora_vips_hasalpha(VipsImage *image) { return vips_image_hasalpha(image); }
static inline int lora_vips_is_ushort(VipsImage *image) {
    VipsBandFormat f = vips_image_get_format(image);
    return f == VIPS_FORMAT_USHORT || f == VIPS_FORMAT_SHORT;
}
static inline int lora_vips_is_uchar(VipsImage *image) { return vips_image_get_format(image) == VIPS_FORMAT_UCHAR; }

static inline VipsImage *lora_vips_from_rgb(const void *data, size_t size, int width, int height) {
    return vips_image_new_from_memory_copy(data, size, width, height, 3, VIPS_FORMAT_UCHAR);
}
static inline int lora_vips_pngsave(VipsImage *in, const char *path) { return vips_pngsave(in, path, NULL); }
/// PNG bytes in a g_malloc'd buffer (free with lora_vips_free).
static inline int lora_vips_pngsave_buffer(VipsImage *in, void **buf, size_t *len) { return vips_pngsave_buffer(in, buf, len, NULL); }
/// A string field; pngsave writes a field named "png-comment-N-KEY" as a PNG text chunk KEY (N orders them).
/// A string field's value (owned by the image), NULL when absent.
static inline const char *lora_vips_get_string(VipsImage *image, const char *name) {
    const char *out = NULL;
    if (vips_image_get_typeof(image, name) == 0 || vips_image_get_string(image, name, &out) != 0) { vips_error_clear(); return NULL; }
    return out;
}
static inline void lora_vips_set_string(VipsImage *image, const char *name, const char *value) {
    vips_image_set_string(image, name, value);
}

static inline void lora_vips_unref(VipsImage *image) { if (image) g_object_unref(image); }
static inline void lora_vips_free(void *p) { g_free(p); }
static inline const char *lora_vips_error(void) { return vips_error_buffer(); }
static inline void lora_vips_error_clear(void) { vips_error_clear(); }
#endif
