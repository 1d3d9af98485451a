import Foundation
import Tensor

/// One latent to cache: which image, where it lands (bucket, resize, crop) and whether it is mirrored.
public struct CacheJob: Sendable, Equatable {
    public let key: LatentKey
    public let entry: DatasetReport.Entry
    public var flip: Bool { key.flip }
}

/// Builds the latent cache for a dataset ahead of training. The VAE and the rank split come in as closures so
/// this target stays free of SDXL and Distributed (the `lora-dist cache` command supplies both).
public enum CacheBuilder {
    /// Every (image, bucket placement, flip) the dataset trains on. kohya caches one latent per image at its
    /// bucket (`cache_batch_latents` in library/train_util.py) and, when `flip_aug` is on, also the mirrored
    /// image (`flipped_latents`), so a subset with flip_aug gives two jobs per image.
    public static func jobs(_ report: DatasetReport, vaeIdentity: String) throws -> [CacheJob] {
        var out: [CacheJob] = []
        var hashes: [String: String] = [:]
        for entry in report.entries {
            let path = entry.image.path
            let hash: String
            if let h = hashes[path] { hash = h } else { hash = try LatentCache.hashFile(path); hashes[path] = hash }
            let p = entry.placement
            let flips = report.subsets.indices.contains(entry.image.subset) && report.subsets[entry.image.subset].flipAug
                ? [false, true] : [false]
            for flip in flips {
                let key = LatentKey(imageHash: hash, imagePath: path, bucket: p.bucket, cropLeft: p.cropLeft,
                                    cropTop: p.cropTop, originalWidth: p.originalWidth,
                                    originalHeight: p.originalHeight, flip: flip, vaeIdentity: vaeIdentity)
                out.append(CacheJob(key: key, entry: entry))
            }
        }
        return out
    }

    /// The encoder input for a job: the image resized and centre-trimmed to its bucket (mirrored if the job
    /// says so) as `[1, 3, H, W]` in [-1, 1].
    public static func input(_ job: CacheJob) throws -> Tensor {
        let p = job.entry.placement
        let img = try ImageIO.load(job.entry.image.path, resizeTo: (p.resizedWidth, p.resizedHeight),
                                   crop: (p.cropLeft, p.cropTop, p.bucket.width, p.bucket.height), flip: job.flip)
        return Tensor(shape: [1, 3, img.height, img.width], img.chwFloats())
    }

    /// Ensures every job `isAssigned` selects is cached: hits are kept, absent/stale/corrupt entries are
    /// encoded (`encode` gets `input(job)` and returns mean/logvar `[1, 4, h, w]` or `[4, h, w]`).
    /// `progress(done, total)` is called after each encode, `total` being this caller's encodes to do at most.
    public static func build(_ jobs: [CacheJob], cache: LatentCache, isAssigned: (CacheJob) -> Bool = { _ in true },
                             encode: (Tensor) throws -> (mean: Tensor, logvar: Tensor),
                             progress: (Int, Int) -> Void = { _, _ in }) throws -> CacheReport {
        var byKey: [LatentKey: CacheJob] = [:]
        for j in jobs where byKey[j.key] == nil { byKey[j.key] = j }
        let mine = byKey.values.filter(isAssigned).count
        var done = 0
        return try cache.ensure(jobs.map(\.key), isAssigned: { isAssigned(byKey[$0]!) }) { key in
            let (mean, logvar) = try encode(try input(byKey[key]!))
            // A VAE that overflows (an fp16 SDXL VAE without the fp16 fix; broken weights) gives NaN/Inf: refuse it
            // here, naming the image and the VAE, instead of caching latents that every later run rejects as corrupt.
            guard mean.fp32().scalars.allSatisfy(\.isFinite), logvar.fp32().scalars.allSatisfy(\.isFinite) else {
                throw DatasetError("\(key.imagePath): the VAE (\(key.vaeIdentity)) encoded it to non-finite latents (NaN/Inf); nothing was cached. The VAE's weights or precision are broken for this image: an fp16 SDXL VAE overflows without the fp16 fix (use sdxl-vae-fp16-fix as vae, or no_half_vae = true); check the VAE file")
            }
            done += 1
            progress(done, mine)
            // Drop a batch axis of 1: the cache stores [4, h, w] (any other shape reaches `store`, which rejects it).
            func squeeze(_ t: Tensor) -> Tensor {
                t.shape.count == 4 && t.shape[0] == 1 ? Tensor(shape: Array(t.shape.dropFirst()), t.fp32().scalars) : t
            }
            return (squeeze(mean), squeeze(logvar))
        }
    }
}
