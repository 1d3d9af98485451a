import CVips
import Foundation

/// A decoded, resized and cropped training image: 8-bit sRGB, 3 channels, row-major HWC.
public struct DecodedImage: Equatable, Sendable {
    public let width, height: Int
    public let rgb: [UInt8]

    public init(width: Int, height: Int, rgb: [UInt8]) {
        precondition(width > 0 && height > 0 && rgb.count == width * height * 3, "DecodedImage: \(width)x\(height) needs \(width * height * 3) bytes, got \(rgb.count)")
        self.width = width; self.height = height; self.rgb = rgb
    }

    /// `[3, H, W]` in [-1, 1], what the VAE encoder takes: kohya's `IMAGE_TRANSFORMS`
    /// (`ToTensor()` then `Normalize([0.5], [0.5])`, i.e. x / 255 * 2 - 1).
    public func chwFloats() -> [Float] {
        let plane = width * height
        var out = [Float](repeating: 0, count: 3 * plane)
        for i in 0..<plane {
            for c in 0..<3 {
                out[c * plane + i] = Float(rgb[i * 3 + c]) / 255 * 2 - 1
            }
        }
        return out
    }
}

/// Image decoding and resizing through libvips (PNG 8/16-bit, palette, grey, alpha; JPEG with EXIF
/// orientation; WebP). Every failure is a `DatasetError` naming the file and libvips's reason.
public enum ImageIO {
    /// libvips is initialised once, lazily and thread-safely (a Swift global is a `dispatch_once`).
    private static let initResult: String? = {
        lora_vips_init(1) == 0 ? nil : takeError()
    }()

    private static func ensureInit() throws {
        if let message = initResult { throw DatasetError("libvips failed to initialise: \(message)") }
    }

    private static func takeError() -> String {
        let message = lora_vips_error().map { String(cString: $0) } ?? ""
        lora_vips_error_clear()
        let trimmed = message.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? "unknown libvips error" : trimmed.replacingOccurrences(of: "\n", with: "; ")
    }

    private static func failure(_ path: String, _ what: String) -> DatasetError {
        DatasetError("\(path): \(what): \(takeError())")
    }

    /// Width and height after EXIF orientation, from the header only (libvips opens lazily: no pixels are
    /// decoded), for bucketing. kohya's `get_image_size` reads PIL's `Image.size`, which ignores EXIF; but
    /// the image kohya trains on is `exif_transpose`d, so the rotated size is the one its bucket must fit.
    public static func size(of path: String) throws -> (width: Int, height: Int) {
        try ensureInit()
        guard let image = lora_vips_open_header(path) else { throw failure(path, "cannot read image header") }
        defer { lora_vips_unref(image) }
        let w = Int(vips_image_get_width(image)), h = Int(vips_image_get_height(image))
        // Orientations 5...8 are transposes: a 90° turn swaps the axes.
        return lora_vips_orientation(image) >= 5 ? (h, w) : (w, h)
    }

    /// Whether the file holds a whole image, from its last bytes (no decoding, so scanning thousands of images costs
    /// nothing): a JPEG must end with its end-of-image marker (FF D9, trailing padding allowed), a PNG with its IEND
    /// chunk, a WebP must be as long as its RIFF header says. An interrupted download or copy passes the header read
    /// (`size(of:)`) but not this; it would otherwise stop a run when its latent is encoded.
    public static func checkComplete(_ path: String) throws {
        guard let h = FileHandle(forReadingAtPath: path) else { throw DatasetError("\(path): cannot open") }
        defer { try? h.close() }
        let head = [UInt8](h.readData(ofLength: 12))
        let size = Int((try? h.seekToEnd()) ?? 0)
        func tail(_ n: Int) -> [UInt8] {
            try? h.seek(toOffset: UInt64(max(0, size - n)))
            return [UInt8](h.readData(ofLength: n))
        }
        if head.starts(with: [0xFF, 0xD8]) {
            let t = tail(4096)
            let hasEOI = t.indices.dropLast().contains { t[$0] == 0xFF && t[$0 + 1] == 0xD9 }
            if !hasEOI { throw DatasetError("\(path): " + "truncated JPEG (no end-of-image marker in its last bytes): the file is incomplete, e.g. an interrupted download") }
        } else if head.starts(with: [0x89, 0x50, 0x4E, 0x47]) {
            let t = tail(64)
            let iend: [UInt8] = Array("IEND".utf8)
            let found = t.count >= 4 && (0...(t.count - 4)).contains { Array(t[$0..<$0 + 4]) == iend }
            if !found { throw DatasetError("\(path): " + "truncated PNG (no IEND chunk at its end): the file is incomplete, e.g. an interrupted download") }
        } else if head.count == 12, head.starts(with: Array("RIFF".utf8)), Array(head[8..<12]) == Array("WEBP".utf8) {
            let riff = Int(head[4]) | Int(head[5]) << 8 | Int(head[6]) << 16 | Int(head[7]) << 24
            if size < riff + 8 { throw DatasetError("\(path): " + "truncated WebP (\(size) bytes of the \(riff + 8) its header announces): the file is incomplete") }
        }
    }

    /// Decode `path`, apply EXIF orientation, resize with Lanczos3 to exactly `resizeTo` (shrink-on-load when
    /// much smaller), composite any alpha over white, convert to 8-bit RGB, crop `crop` out of the resized
    /// image (kohya's `trim_and_resize_if_required` centre trim: the caller's `Placement` gives both) and
    /// optionally mirror it horizontally (`flip_aug`).
    public static func load(
        _ path: String, resizeTo: (w: Int, h: Int), crop: (left: Int, top: Int, width: Int, height: Int),
        flip: Bool = false
    ) throws -> DecodedImage {
        try ensureInit()
        guard resizeTo.w > 0, resizeTo.h > 0 else {
            throw DatasetError("\(path): resize target \(resizeTo.w)x\(resizeTo.h) is empty")
        }
        guard crop.width > 0, crop.height > 0, crop.left >= 0, crop.top >= 0,
              crop.left + crop.width <= resizeTo.w, crop.top + crop.height <= resizeTo.h else {
            throw DatasetError("\(path): crop \(crop) does not fit in the resized \(resizeTo.w)x\(resizeTo.h) image")
        }
        guard FileManager.default.fileExists(atPath: path) else { throw DatasetError("\(path): file does not exist") }

        var images: [UnsafeMutablePointer<VipsImage>] = []
        defer { images.forEach { lora_vips_unref($0) } }
        // Run one libvips step; its output is kept alive until the end (each step references its input).
        func step(_ what: String, _ body: (UnsafeMutablePointer<UnsafeMutablePointer<VipsImage>?>) -> Int32) throws
            -> UnsafeMutablePointer<VipsImage>
        {
            var out: UnsafeMutablePointer<VipsImage>?
            guard body(&out) == 0, let image = out else { throw failure(path, what) }
            images.append(image)
            return image
        }

        var image = try step("cannot decode image") {
            lora_vips_thumbnail(path, $0, Int32(resizeTo.w), Int32(resizeTo.h))
        }
        if lora_vips_is_ushort(image) != 0 {
            // 16-bit: scale 0...65535 onto 0...255 with rounding (x * 255/65535 + 0.5, then truncating cast),
            // alpha included, before anything assumes 8-bit.
            let scaled = image
            image = try step("cannot convert 16-bit to 8-bit") { lora_vips_linear1(scaled, $0, 255.0 / 65535.0, 0.5) }
            let linear = image
            image = try step("cannot convert 16-bit to 8-bit") { lora_vips_cast_uchar(linear, $0) }
        }
        if lora_vips_hasalpha(image) != 0 {
            // Transparent pixels become white, not whatever colour the encoder left under alpha 0.
            let withAlpha = image
            image = try step("cannot composite alpha on white") { lora_vips_flatten(withAlpha, $0, 255, 255) }
        }
        if lora_vips_is_uchar(image) == 0 {
            let other = image
            image = try step("cannot convert to 8-bit") { lora_vips_cast_uchar(other, $0) }
        }
        if vips_image_get_bands(image) == 1 {
            let grey = image
            image = try step("cannot expand grey to RGB") { lora_vips_grey_to_rgb(grey, $0) }
        }
        let bands = Int(vips_image_get_bands(image))
        guard bands == 3 else {
            throw DatasetError("\(path): unsupported image with \(bands) bands after decoding (CMYK or multispectral?)")
        }
        let resized = (Int(vips_image_get_width(image)), Int(vips_image_get_height(image)))
        guard resized == (resizeTo.w, resizeTo.h) else {
            throw DatasetError("\(path): libvips resized to \(resized.0)x\(resized.1), expected \(resizeTo.w)x\(resizeTo.h)")
        }
        if (crop.left, crop.top, crop.width, crop.height) != (0, 0, resizeTo.w, resizeTo.h) {
            let full = image
            image = try step("cannot crop") {
                lora_vips_extract_area(full, $0, Int32(crop.left), Int32(crop.top), Int32(crop.width), Int32(crop.height))
            }
        }
        if flip {
            let unflipped = image
            image = try step("cannot flip") { lora_vips_flip_horizontal(unflipped, $0) }
        }

        var size = 0
        guard let memory = vips_image_write_to_memory(image, &size) else { throw failure(path, "cannot decode pixels") }
        defer { lora_vips_free(memory) }
        guard size == crop.width * crop.height * 3 else {
            throw DatasetError("\(path): decoded \(size) bytes, expected \(crop.width * crop.height * 3)")
        }
        let rgb = [UInt8](UnsafeRawBufferPointer(start: memory, count: size))
        return DecodedImage(width: crop.width, height: crop.height, rgb: rgb)
    }

    /// A PNG's text chunk `key` (tEXt, zTXt or iTXt, as libvips reads them into png-comment-<n>-<key>), nil when absent.
    public static func pngText(_ path: String, key: String) throws -> String? {
        try ensureInit()
        guard let image = lora_vips_open_header(path) else { throw failure(path, "cannot open") }
        defer { lora_vips_unref(image) }
        for n in 0..<64 {
            if let value = lora_vips_get_string(image, "png-comment-\(n)-\(key)") { return String(cString: value) }
        }
        return nil
    }

    /// Write 8-bit RGB (HWC) as a PNG, with `text` as PNG text chunks (keyword, text) in order — e.g. A1111's
    /// "parameters", which A1111's PNG Info, ComfyUI and most image viewers read.
    public static func writePNG(_ rgb: [UInt8], width: Int, height: Int, text: [(key: String, value: String)] = [],
                                to path: String) throws {
        try withImage(rgb, width: width, height: height, text: text, what: path) { image in
            guard lora_vips_pngsave(image, path) == 0 else { throw failure(path, "cannot write PNG") }
        }
    }

    /// The PNG file `writePNG` writes, as bytes (for a TensorBoard image summary, or to send to another rank).
    public static func encodePNG(_ rgb: [UInt8], width: Int, height: Int, text: [(key: String, value: String)] = []) throws -> [UInt8] {
        try withImage(rgb, width: width, height: height, text: text, what: "PNG in memory") { image in
            var buffer: UnsafeMutableRawPointer? = nil
            var length = 0
            guard lora_vips_pngsave_buffer(image, &buffer, &length) == 0, let buffer else { throw failure("PNG in memory", "cannot encode PNG") }
            defer { lora_vips_free(buffer) }
            return [UInt8](UnsafeRawBufferPointer(start: buffer, count: length))
        }
    }

    private static func withImage<T>(_ rgb: [UInt8], width: Int, height: Int, text: [(key: String, value: String)], what: String,
                                     _ body: (UnsafeMutablePointer<VipsImage>) throws -> T) throws -> T {
        try ensureInit()
        guard width > 0, height > 0, rgb.count == width * height * 3 else {
            throw DatasetError("\(what): \(width)x\(height) RGB needs \(width * height * 3) bytes, got \(rgb.count)")
        }
        let image = rgb.withUnsafeBytes { lora_vips_from_rgb($0.baseAddress, $0.count, Int32(width), Int32(height)) }
        guard let image else { throw failure(what, "cannot wrap pixels") }
        defer { lora_vips_unref(image) }
        for (i, chunk) in text.enumerated() {
            // libvips (vips_image_map in the PNG savers) turns png-comment-<n>-<key> fields into text chunks.
            lora_vips_set_string(image, "png-comment-\(i)-\(chunk.key)", chunk.value)
        }
        return try body(image)
    }
}
