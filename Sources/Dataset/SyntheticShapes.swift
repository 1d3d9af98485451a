import Base
import Foundation

/// `builtin:shapes`: a small procedurally drawn dataset for the embedded demo, so a first run needs no
/// downloaded images. Each image is one shape (circle, square, triangle, ring, star) in a named colour on a
/// plain named background, anti-aliased by 4×4 supersampling at the edges, with a kohya-style caption
/// (`demo_trigger, red circle, blue background`). Everything is derived from the seed through SplitMix64, so
/// the same seed writes byte-identical files on every machine.
public enum SyntheticShapes {
    public static let trigger = "demo_trigger"

    /// Named colours, shared by shapes and backgrounds (a shape never gets its background's colour).
    public static let colours: [(name: String, rgb: (UInt8, UInt8, UInt8))] = [
        ("red", (220, 30, 30)), ("green", (30, 170, 60)), ("blue", (30, 70, 220)),
        ("yellow", (240, 210, 30)), ("purple", (140, 40, 170)), ("orange", (245, 130, 20)),
        ("white", (245, 245, 245)), ("black", (15, 15, 15)), ("cyan", (30, 200, 210)),
        ("pink", (240, 120, 180)), ("gray", (128, 128, 128)),
    ]

    public enum Shape: String, CaseIterable, Sendable {
        case circle, square, triangle, ring, star
    }

    /// SDXL-style aspect ratios, all multiples of 64 at scale 1 (kohya buckets step by 64); cycled by index
    /// so every run of at least five images holds square, portrait and landscape pictures.
    public static let baseSizes: [(width: Int, height: Int)] = [
        (1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896),
    ]

    /// One drawn image and what is in it.
    public struct Drawing: Sendable {
        public let image: DecodedImage
        public let shape: Shape
        public let shapeColour: String
        public let background: String
        /// A pixel well inside the shape (the centre, except for the ring, whose centre is the hole).
        public let interiorPoint: (x: Int, y: Int)
        public var caption: String { "\(SyntheticShapes.trigger), \(shapeColour) \(shape.rawValue), \(background) background" }
    }

    /// Size of image `index` at `scale`: the base size scaled and rounded to a multiple of 8 (the VAE's
    /// downsampling factor), never below 64.
    public static func size(index: Int, scale: Double) -> (width: Int, height: Int) {
        let base = baseSizes[index % baseSizes.count]
        func s(_ v: Int) -> Int { max(64, Int((Double(v) * scale / 8).rounded()) * 8) }
        return (s(base.width), s(base.height))
    }

    /// Draw image `index` of the dataset for `seed`.
    public static func render(index: Int, seed: UInt64 = 0, scale: Double = 1.0) -> Drawing {
        precondition(index >= 0 && scale > 0, "SyntheticShapes.render: index \(index), scale \(scale)")
        // Each image has its own stream, so image i does not depend on how many came before it.
        var rng = SplitMix64(seed: seed ^ (UInt64(index) &* 0xD1B5_4A32_D192_ED03))
        let (w, h) = size(index: index, scale: scale)
        let shape = Shape.allCases[rng.moduloBelow(Shape.allCases.count)]
        let bgIndex = rng.moduloBelow(colours.count)
        var fgIndex = rng.moduloBelow(colours.count - 1)
        if fgIndex >= bgIndex { fgIndex += 1 }
        let bg = colours[bgIndex], fg = colours[fgIndex]

        let minSide = Double(min(w, h))
        let radius = minSide * (0.2 + 0.15 * rng.uniform())
        // Keep the whole shape at least 4 px (and 5% of the short side) away from the border, so the corners
        // are always pure background.
        let margin = max(4.0, minSide * 0.05)
        let maxDX = max(0, Double(w) / 2 - radius - margin), maxDY = max(0, Double(h) / 2 - radius - margin)
        let cx = Double(w) / 2 + (rng.uniform() * 2 - 1) * maxDX
        let cy = Double(h) / 2 + (rng.uniform() * 2 - 1) * maxDY
        let inside = insideTest(shape, radius: radius)

        var rgb = [UInt8](repeating: 0, count: w * h * 3)
        for i in 0..<(w * h) { rgb[i * 3] = bg.rgb.0; rgb[i * 3 + 1] = bg.rgb.1; rgb[i * 3 + 2] = bg.rgb.2 }
        let x0 = max(0, Int((cx - radius).rounded(.down)) - 1), x1 = min(w - 1, Int((cx + radius).rounded(.up)) + 1)
        let y0 = max(0, Int((cy - radius).rounded(.down)) - 1), y1 = min(h - 1, Int((cy + radius).rounded(.up)) + 1)
        if x0 <= x1 && y0 <= y1 {
            for py in y0...y1 {
                for px in x0...x1 {
                    let coverage = pixelCoverage(px: px, py: py, cx: cx, cy: cy, inside: inside)
                    guard coverage > 0 else { continue }
                    let o = (py * w + px) * 3
                    rgb[o] = blend(bg.rgb.0, fg.rgb.0, coverage)
                    rgb[o + 1] = blend(bg.rgb.1, fg.rgb.1, coverage)
                    rgb[o + 2] = blend(bg.rgb.2, fg.rgb.2, coverage)
                }
            }
        }
        let probe = shape == .ring ? (x: Int(cx + radius * 0.8), y: Int(cy)) : (x: Int(cx), y: Int(cy))
        return Drawing(image: DecodedImage(width: w, height: h, rgb: rgb), shape: shape,
                       shapeColour: fg.name, background: bg.name, interiorPoint: probe)
    }

    /// Writes `count` PNG + .txt pairs (`shapes_0000.png`, `shapes_0000.txt`, …) into `folder` (created if
    /// missing); returns the image paths.
    @discardableResult
    public static func write(to folder: URL, count: Int = 24, seed: UInt64 = 0, scale: Double = 1.0) throws -> [URL] {
        guard count >= 0 else { throw DatasetError("builtin:shapes: count \(count) must not be negative") }
        guard scale > 0, scale.isFinite else { throw DatasetError("builtin:shapes: scale \(scale) must be positive") }
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        var paths: [URL] = []
        for index in 0..<count {
            let drawing = render(index: index, seed: seed, scale: scale)
            let name = String(format: "shapes_%04d", index)
            let png = folder.appendingPathComponent(name + ".png")
            try ImageIO.writePNG(drawing.image.rgb, width: drawing.image.width, height: drawing.image.height, to: png.path)
            try Data(drawing.caption.utf8).write(to: folder.appendingPathComponent(name + ".txt"), options: .atomic)
            paths.append(png)
        }
        return paths
    }

    // MARK: - Rasterisation

    private static func blend(_ a: UInt8, _ b: UInt8, _ t: Double) -> UInt8 {
        UInt8(max(0, min(255, (Double(a) * (1 - t) + Double(b) * t).rounded())))
    }

    /// Fraction of pixel (px, py) covered. The pixel's four corners and centre are tested first; when they
    /// agree the pixel is taken as fully in or out, otherwise 4×4 samples are averaged (edges only, so a
    /// large image stays cheap).
    private static func pixelCoverage(px: Int, py: Int, cx: Double, cy: Double, inside: (Double, Double) -> Bool) -> Double {
        let x = Double(px) - cx, y = Double(py) - cy
        let probes = [inside(x, y), inside(x + 1, y), inside(x, y + 1), inside(x + 1, y + 1), inside(x + 0.5, y + 0.5)]
        if probes.allSatisfy({ $0 }) { return 1 }
        if !probes.contains(true) { return 0 }
        var hits = 0
        for sy in 0..<4 {
            for sx in 0..<4 where inside(x + (Double(sx) + 0.5) / 4, y + (Double(sy) + 0.5) / 4) { hits += 1 }
        }
        return Double(hits) / 16
    }

    /// Point-in-shape test in coordinates relative to the shape's centre (y down).
    private static func insideTest(_ shape: Shape, radius r: Double) -> (Double, Double) -> Bool {
        switch shape {
        case .circle:
            return { x, y in x * x + y * y <= r * r }
        case .square:
            let s = r * 0.8
            return { x, y in abs(x) <= s && abs(y) <= s }
        case .ring:
            let inner = r * 0.6
            return { x, y in let d = x * x + y * y; return d <= r * r && d >= inner * inner }
        case .triangle:
            return polygon((0..<3).map { k in
                let a = Double(k) * 2 * Double.pi / 3
                return (r * sin(a), -r * cos(a))
            })
        case .star:
            return polygon((0..<10).map { k in
                let a = Double(k) * Double.pi / 5
                let rr = k % 2 == 0 ? r : r * 0.45
                return (rr * sin(a), -rr * cos(a))
            })
        }
    }

    /// Even-odd point-in-polygon test.
    private static func polygon(_ v: [(Double, Double)]) -> (Double, Double) -> Bool {
        return { x, y in
            var inside = false
            var j = v.count - 1
            for i in 0..<v.count {
                let (xi, yi) = v[i], (xj, yj) = v[j]
                if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi { inside.toggle() }
                j = i
            }
            return inside
        }
    }
}

extension SplitMix64 {
    /// Uniform-ish in 0..<n by a plain modulo (bias negligible for the tiny n used here); the drawn dataset was made
    /// with it, so it stays.
    fileprivate mutating func moduloBelow(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}
