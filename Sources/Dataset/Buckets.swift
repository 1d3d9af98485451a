import Foundation

// Aspect-ratio bucketing exactly as kohya sd-scripts does it (commit 48d368fa557731ad0488c07304dfeba8c07910eb):
// library/model_util.py `make_bucket_resolutions`, library/train_util.py `BucketManager` (`make_buckets`,
// `select_bucket`, `round_to_steps`, `get_crop_ltrb`), `BaseDataset.adjust_min_max_bucket_reso_by_steps`,
// `trim_and_resize_if_required` and the SDXL size conditioning built in `BaseDataset.__getitem__`.
// Every Double operation below is the one Python performs (same IEEE operations, same order), so the chosen
// buckets, resized sizes and crop numbers are bit-for-bit kohya's; Tests/Fixtures/dataset/make_buckets.py
// runs kohya's code and BucketTests compares against its table.

/// A bucket (or any pixel size), width first like kohya's `(w, h)` tuples; ordered like a Python tuple sort.
public struct BucketSize: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public let width: Int
    public let height: Int
    public init(width: Int, height: Int) { self.width = width; self.height = height }
    public static func < (a: BucketSize, b: BucketSize) -> Bool {
        a.width != b.width ? a.width < b.width : a.height < b.height
    }
    public var description: String { "\(width)x\(height)" }
}

/// One base resolution's bucketing settings, named like kohya's dataset config keys.
public struct BucketConfig: Sendable, Equatable {
    /// `resolution` (w, h); kohya's area budget is width × height.
    public var width: Int
    public var height: Int
    /// `min_bucket_reso` / `max_bucket_reso` (kohya defaults 256 / 1024), `bucket_reso_steps` (64).
    public var minSize: Int
    public var maxSize: Int
    public var step: Int
    /// `bucket_no_upscale`: the bucket comes from the image's own size (only ever downscaled); min/max unused.
    public var noUpscale: Bool
    /// SDXL scripts call `verify_bucket_reso_steps(32)`: the step must be a multiple of this.
    public var stepMultiple: Int

    public init(width: Int, height: Int, minSize: Int = 256, maxSize: Int = 1024, step: Int = 64,
                noUpscale: Bool = false, stepMultiple: Int = 32) {
        self.width = width; self.height = height; self.minSize = minSize; self.maxSize = maxSize
        self.step = step; self.noUpscale = noUpscale; self.stepMultiple = stepMultiple
    }

    public init(resolution: Int, minSize: Int = 256, maxSize: Int = 1024, step: Int = 64,
                noUpscale: Bool = false, stepMultiple: Int = 32) {
        self.init(width: resolution, height: resolution, minSize: minSize, maxSize: maxSize, step: step,
                  noUpscale: noUpscale, stepMultiple: stepMultiple)
    }
}

/// Python's float `//` (float_floor_div in CPython's floatobject.c): not always floor(a / b) when the
/// quotient rounds up to an integer, so it is reproduced step by step.
@inline(__always)
func pyFloorDiv(_ a: Double, _ b: Double) -> Double {
    var mod = a.truncatingRemainder(dividingBy: b)   // C fmod
    var div = (a - mod) / b
    if mod != 0 {
        if (b < 0) != (mod < 0) { mod += b; div -= 1 }
    }
    if div == 0 { return (0.0).sign == (a / b).sign ? 0.0 : -0.0 }
    var floordiv = div.rounded(.down)
    if div - floordiv > 0.5 { floordiv += 1 }
    return floordiv
}

public enum Buckets {
    /// kohya `make_bucket_resolutions(max_reso, min_size, max_size, divisible)`: the square bucket of the
    /// area, then for every width from minSize to maxSize (by step) the tallest step-multiple height within
    /// the area (capped at maxSize), both orientations; deduplicated and sorted (w, then h).
    public static func resolutions(maxArea: Int, minSize: Int, maxSize: Int, step: Int) -> [BucketSize] {
        var resos = Set<BucketSize>()
        let side = Int(pyFloorDiv(Double(maxArea).squareRoot(), Double(step))) * step
        resos.insert(BucketSize(width: side, height: side))
        var width = minSize
        while width <= maxSize {
            let height = min(maxSize, ((maxArea / width) / step) * step)
            if height >= minSize {
                resos.insert(BucketSize(width: width, height: height))
                resos.insert(BucketSize(width: height, height: width))
            }
            width += step
        }
        return resos.sorted()
    }
}

/// kohya `get_crop_ltrb`: NOT the pixels cut away. It is where the whole image would sit if fitted inside the
/// bucket (Stability AI's preprocessing), in floats; SDXL's crop conditioning is taken from it.
public struct CropBox: Equatable, Sendable {
    public let left, top, right, bottom: Double
}

/// The SDXL micro-conditioning numbers kohya feeds for one image (`original_sizes_hw`, `crop_top_lefts`,
/// `target_sizes_hw`), height first as kohya stores them.
public struct SDXLSizeConditioning: Equatable, Sendable {
    public let originalHeight, originalWidth: Int
    public let cropTop, cropLeft: Int
    public let targetHeight, targetWidth: Int

    public init(originalHeight: Int, originalWidth: Int, cropTop: Int, cropLeft: Int, targetHeight: Int, targetWidth: Int) {
        self.originalHeight = originalHeight; self.originalWidth = originalWidth
        self.cropTop = cropTop; self.cropLeft = cropLeft
        self.targetHeight = targetHeight; self.targetWidth = targetWidth
    }
}

/// Where one image goes: its bucket, the size it is resized to (covering the bucket), and the trim.
public struct Placement: Equatable, Sendable {
    public let bucket: BucketSize
    public let resizedWidth, resizedHeight: Int
    /// Centre trim of the resized image down to the bucket (`trim_and_resize_if_required`, random_crop off).
    public let cropLeft, cropTop: Int
    public let originalWidth, originalHeight: Int
    /// kohya's `ar_error`: bucket aspect − image aspect.
    public let arError: Double
    public let cropBox: CropBox

    /// The image after trimming is the bucket's size.
    public var targetSize: BucketSize { bucket }

    /// Random crop (`random_crop = true`): each axis's offset uniform in 0...excess, like kohya's
    /// `random.randint(0, trim_size)` but from the caller's seeded generator. kohya leaves the SDXL crop
    /// conditioning unchanged for random crops ("no idea how to reflect it"), and so does `sdxlConditioning`.
    public func randomCrop<G: RandomNumberGenerator>(using rng: inout G) -> (left: Int, top: Int) {
        let excessW = resizedWidth - bucket.width, excessH = resizedHeight - bucket.height
        let left = excessW > 0 ? Int.random(in: 0...excessW, using: &rng) : 0
        let top = excessH > 0 ? Int.random(in: 0...excessH, using: &rng) : 0
        return (left, top)
    }

    /// `BaseDataset.__getitem__`: crop left/top from `get_crop_ltrb`; for a flipped image the left is
    /// target width − crop right. Every number is Python `int()` (truncation) of kohya's floats.
    public func sdxlConditioning(flipped: Bool = false) -> SDXLSizeConditioning {
        let left = flipped ? Double(bucket.width) - cropBox.right : cropBox.left
        return SDXLSizeConditioning(
            originalHeight: originalHeight, originalWidth: originalWidth,
            cropTop: Int(cropBox.top), cropLeft: Int(left),
            targetHeight: bucket.height, targetWidth: bucket.width)
    }
}

/// kohya's `BucketManager` for one base resolution.
public struct Bucketing: Sendable {
    public let config: BucketConfig
    /// min/max after kohya's rounding to the step (min down, max up).
    public let minSize: Int
    public let maxSize: Int
    /// kohya's warnings for the rounding above (it proceeds with the rounded values).
    public let adjustments: [String]
    /// The predefined buckets (`make_buckets`); empty with noUpscale, where kohya makes none.
    public let resolutions: [BucketSize]
    private let resolutionSet: Set<BucketSize>
    private let aspectRatios: [Double]

    public init(config: BucketConfig) throws {
        let c = config
        for (name, value) in [("resolution width", c.width), ("resolution height", c.height),
                              ("min_bucket_reso", c.minSize), ("max_bucket_reso", c.maxSize),
                              ("bucket_reso_steps", c.step)] where value <= 0 {
            throw DatasetError("\(name) is \(value); it must be a positive number of pixels")
        }
        if c.stepMultiple > 0 && c.step % c.stepMultiple != 0 {
            throw DatasetError("bucket_reso_steps is \(c.step); SDXL needs a multiple of \(c.stepMultiple) "
                + "(kohya verify_bucket_reso_steps)")
        }
        // adjust_min_max_bucket_reso_by_steps
        var notes: [String] = []
        var mn = c.minSize, mx = c.maxSize
        if mn % c.step != 0 {
            let adjusted = mn - mn % c.step
            notes.append("min_bucket_reso \(mn) adjusted to \(adjusted), a multiple of bucket_reso_steps \(c.step)")
            mn = adjusted
        }
        if mx % c.step != 0 {
            let adjusted = mx + c.step - mx % c.step
            notes.append("max_bucket_reso \(mx) adjusted to \(adjusted), a multiple of bucket_reso_steps \(c.step)")
            mx = adjusted
        }
        if min(c.width, c.height) < mn {
            throw DatasetError("min_bucket_reso \(mn) is larger than the resolution's smaller side "
                + "\(min(c.width, c.height)); lower min_bucket_reso or raise resolution")
        }
        if max(c.width, c.height) > mx {
            throw DatasetError("max_bucket_reso \(mx) is smaller than the resolution's larger side "
                + "\(max(c.width, c.height)); raise max_bucket_reso or lower resolution")
        }
        if mn > mx {
            throw DatasetError("min_bucket_reso \(mn) is larger than max_bucket_reso \(mx)")
        }
        self.config = c
        self.minSize = mn
        self.maxSize = mx
        self.adjustments = notes
        let resos = c.noUpscale ? [] : Buckets.resolutions(maxArea: c.width * c.height, minSize: mn, maxSize: mx,
                                                           step: c.step)
        self.resolutions = resos
        self.resolutionSet = Set(resos)
        self.aspectRatios = resos.map { Double($0.width) / Double($0.height) }
    }

    /// kohya `round_to_steps`: round half up, then down to the step.
    func roundToSteps(_ x: Double) -> Int {
        let r = Int(x + 0.5)
        return r - r % config.step
    }

    /// kohya `select_bucket` + `trim_and_resize_if_required` + `get_crop_ltrb` for an image of this size.
    /// nil where kohya cannot train the image: with noUpscale an image narrower or shorter than one step gets
    /// a zero-sized bucket (kohya then fails: ZeroDivisionError on a zero height, an empty crop on a zero
    /// width) — the caller reports it as a `DatasetIssue`; also nil for a non-positive size.
    public func choose(width imageWidth: Int, height imageHeight: Int) -> Placement? {
        guard imageWidth > 0, imageHeight > 0 else { return nil }
        let step = config.step
        let aspectRatio = Double(imageWidth) / Double(imageHeight)
        let reso: BucketSize
        let resized: (Int, Int)
        if !config.noUpscale {
            // Scale up or down. The image's own size wins when it is a bucket; otherwise the bucket with the
            // smallest |aspect error| (numpy argmin: the first of equals, in sorted order).
            if resolutionSet.contains(BucketSize(width: imageWidth, height: imageHeight)) {
                reso = BucketSize(width: imageWidth, height: imageHeight)
            } else {
                var best = 0
                var bestError = Double.infinity
                for (i, ar) in aspectRatios.enumerated() {
                    let e = abs(ar - aspectRatio)
                    if e < bestError { bestError = e; best = i }
                }
                reso = resolutions[best]
            }
            let arReso = Double(reso.width) / Double(reso.height)
            // Image wider than the bucket: match heights (and crop the sides); else match widths.
            let scale = aspectRatio > arReso ? Double(reso.height) / Double(imageHeight)
                                             : Double(reso.width) / Double(imageWidth)
            resized = (Int(Double(imageWidth) * scale + 0.5), Int(Double(imageHeight) * scale + 0.5))
        } else {
            if imageWidth * imageHeight > config.width * config.height {
                // Too large: shrink to the area budget keeping the aspect, then put whichever side gives the
                // smaller aspect error on the step.
                let maxArea = Double(config.width * config.height)
                let resizedWidth = (maxArea * aspectRatio).squareRoot()
                let resizedHeight = maxArea / resizedWidth
                guard abs(resizedWidth / resizedHeight - aspectRatio) < 1e-2 else { return nil }  // kohya asserts

                let bWidthRounded = roundToSteps(resizedWidth)
                let bHeightInWR = roundToSteps(Double(bWidthRounded) / aspectRatio)
                let bHeightRounded = roundToSteps(resizedHeight)
                let bWidthInHR = roundToSteps(Double(bHeightRounded) * aspectRatio)
                guard bHeightInWR != 0, bHeightRounded != 0 else { return nil }  // kohya: ZeroDivisionError
                let arWidthRounded = Double(bWidthRounded) / Double(bHeightInWR)
                let arHeightRounded = Double(bWidthInHR) / Double(bHeightRounded)
                if abs(arWidthRounded - aspectRatio) < abs(arHeightRounded - aspectRatio) {
                    resized = (bWidthRounded, Int(Double(bWidthRounded) / aspectRatio + 0.5))
                } else {
                    resized = (Int(Double(bHeightRounded) * aspectRatio + 0.5), bHeightRounded)
                }
            } else {
                resized = (imageWidth, imageHeight)  // no resize
            }
            // The bucket is the resized size rounded down to the step: crop, never pad.
            reso = BucketSize(width: resized.0 - resized.0 % step, height: resized.1 - resized.1 % step)
        }
        guard reso.width > 0, reso.height > 0 else { return nil }
        // A cover-resize never falls short of the bucket (kohya asserts this after trimming).
        guard resized.0 >= reso.width, resized.1 >= reso.height else { return nil }
        let arError = Double(reso.width) / Double(reso.height) - aspectRatio

        // trim_and_resize_if_required, centre crop: offset = excess // 2 on each axis.
        let cropLeft = (resized.0 - reso.width) / 2
        let cropTop = (resized.1 - reso.height) / 2

        // get_crop_ltrb(bucket_reso, original_size)
        let bucketAR = Double(reso.width) / Double(reso.height)
        let imageAR = Double(imageWidth) / Double(imageHeight)
        let fitW, fitH: Double
        if bucketAR > imageAR {
            fitW = Double(reso.height) * imageAR
            fitH = Double(reso.height)
        } else {
            fitW = Double(reso.width)
            fitH = Double(reso.width) / imageAR
        }
        let boxLeft = pyFloorDiv(Double(reso.width) - fitW, 2)
        let boxTop = pyFloorDiv(Double(reso.height) - fitH, 2)
        let box = CropBox(left: boxLeft, top: boxTop, right: boxLeft + fitW, bottom: boxTop + fitH)

        return Placement(bucket: reso, resizedWidth: resized.0, resizedHeight: resized.1,
                         cropLeft: cropLeft, cropTop: cropTop,
                         originalWidth: imageWidth, originalHeight: imageHeight,
                         arError: arError, cropBox: box)
    }
}

/// Several base resolutions at once (AI Toolkit's `resolution: [512, 768, 1024]`): every image is bucketed
/// at each listed resolution independently, with kohya's rules at each.
public struct MultiResolutionBucketing: Sendable {
    public let levels: [Bucketing]

    public init(configs: [BucketConfig]) throws {
        guard !configs.isEmpty else { throw DatasetError("the resolution list is empty; give at least one") }
        levels = try configs.map { try Bucketing(config: $0) }
    }

    /// One placement per listed resolution, in the listed order (nil where that level cannot use the image).
    public func choose(width: Int, height: Int) -> [Placement?] {
        levels.map { $0.choose(width: width, height: height) }
    }
}
