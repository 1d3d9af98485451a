import Foundation

/// One training image found on disk, with its caption (or the class-token fallback).
public struct DatasetImage: Equatable, Sendable {
    public let path: String
    /// The caption file read, nil when none was usable.
    public let captionPath: String?
    /// The caption text (first line, stripped, as kohya's `read_caption`), nil when none was usable.
    public let caption: String?
    /// The subset's class token, used when `caption` is nil.
    public let classToken: String?
    public let repeats: Int
    /// Index into `DatasetConfig.subsets`.
    public let subset: Int
}

/// File extensions treated as images (kohya's IMAGE_EXTENSIONS in library/train_util.py, case-insensitive,
/// without the optional .bmp/.avif/.jxl that need extra decoders).
let imageExtensions: Set<String> = ["png", "jpg", "jpeg", "webp"]

extension DatasetConfig {
    /// Layouts 1 and 2 as a config. A folder holding images directly is an AI Toolkit flat folder (one subset,
    /// 1 repeat, no class token); otherwise each `N_name` subfolder is a kohya DreamBooth subset with N repeats
    /// and class token `name`, parsed as `generate_dreambooth_subsets_config_by_subdirs` does (split on "_", the
    /// first token must be an integer, the rest joined by "_"). A subfolder without a numeric prefix, or with
    /// N < 1, is skipped with an issue. `captionExtension` defaults to ".txt" (AI Toolkit's and what kohya users
    /// pass; kohya's own argparse default is ".caption").
    public static func folder(_ url: URL, captionExtension: String = ".txt", resolution: [Int]? = nil) -> DatasetConfig {
        let fm = FileManager.default
        var base = SubsetConfig()
        base.captionExtension = captionExtension
        base.resolution = resolution
        let root = url.standardizedFileURL
        var issues: [DatasetIssue] = []
        guard let entries = try? fm.contentsOfDirectory(atPath: root.path) else {
            var c = base; c.imageDir = root.path
            return DatasetConfig(datasets: [[c]], source: root.path)   // the scan reports missing / unreadable
        }
        let hasImages = entries.contains { imageExtensions.contains(($0 as NSString).pathExtension.lowercased()) }
        if hasImages {
            var c = base; c.imageDir = root.path
            // The N_name folder itself given as train_data_dir (kohya wants its parent and would find no subset there;
            // as a flat folder it used to train at 1 repeat without a word): its repeats and class token apply.
            let tokens = root.lastPathComponent.split(separator: "_", maxSplits: 1).map(String.init)
            if tokens.count == 2, let n = Int(tokens[0]), n >= 1, !tokens[1].isEmpty {
                c.numRepeats = n
                c.classTokens = tokens[1]
                issues.append(DatasetIssue(path: root.path, reason: "train_data_dir is itself a kohya repeats folder: its images train with \(n) repeats and class token '\(tokens[1])', as they would with train_data_dir = \(root.deletingLastPathComponent().path) (kohya expects the N_name folders inside train_data_dir)", skipped: false))
            }
            return DatasetConfig(datasets: [[c]], issues: issues, source: root.path)
        }
        let rootReal = root.resolvingSymlinksInPath().path
        var subsets: [SubsetConfig] = []
        for name in entries.sorted() {
            let p = root.appendingPathComponent(name)
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: p.path, isDirectory: &isDir), isDir.boolValue else { continue }
            // A directory symlink pointing back at the root or one of its ancestors would make the dataset
            // contain itself: skip it rather than follow the cycle.
            let real = p.resolvingSymlinksInPath().path
            if real == rootReal || rootReal.hasPrefix(real + "/") {
                issues.append(DatasetIssue(path: p.path, reason: "directory symlink loop (points to \(real))"))
                continue
            }
            let tokens = name.split(separator: "_", omittingEmptySubsequences: false)
            guard let n = Int(tokens[0].trimmingCharacters(in: .whitespaces)) else {
                issues.append(DatasetIssue(path: p.path, reason: "folder name has no repeat-count prefix (expected N_name, e.g. 10_mychar)"))
                continue
            }
            guard n >= 1 else {
                issues.append(DatasetIssue(path: p.path, reason: "repeat count \(n) < 1"))
                continue
            }
            var c = base
            c.imageDir = p.path
            c.numRepeats = n
            c.classTokens = tokens.dropFirst().joined(separator: "_")
            subsets.append(c)
        }
        if subsets.isEmpty {   // nothing to split into subsets: scan the folder itself so it reports "no images"
            var c = base; c.imageDir = root.path; subsets = [c]
        }
        return DatasetConfig(datasets: [subsets], issues: issues, source: root.path)
    }
}

/// The images and captions of a config, with every skipped file as an issue.
public struct DatasetScan: Sendable {
    public let images: [DatasetImage]
    public let issues: [DatasetIssue]

    /// Scans each subset's `image_dir` (not recursive, as kohya's `glob_images`), sorted by path. Throws only when
    /// no usable image is left.
    public static func scan(_ config: DatasetConfig) throws -> DatasetScan {
        let fm = FileManager.default
        var images: [DatasetImage] = []
        var issues = config.issues
        for (si, s) in config.subsets.enumerated() {
            if let metadata = s.metadataFile {
                images += try fineTuningImages(s, subset: si, metadata: metadata, issues: &issues)
                continue
            }
            guard let dir = s.imageDir else { continue }
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: dir, isDirectory: &isDir) else {
                issues.append(DatasetIssue(path: dir, reason: "folder does not exist")); continue
            }
            guard isDir.boolValue else { issues.append(DatasetIssue(path: dir, reason: "not a folder")); continue }
            let names: [String]
            do { names = try fm.contentsOfDirectory(atPath: dir) } catch {
                issues.append(DatasetIssue(path: dir, reason: "cannot read folder: \(error.localizedDescription)")); continue
            }
            let imgs = names.filter { imageExtensions.contains(($0 as NSString).pathExtension.lowercased()) }
                .map { (dir as NSString).appendingPathComponent($0) }.sorted()
            var claimed: [String: String] = [:]   // caption path -> first image using it
            var missing: [String] = [], used = 0   // images without a caption file; images kept
            for img in imgs {
                // A symlink that cannot be resolved (cycle or dangling) is not an image.
                guard let attrs = try? fm.attributesOfItem(atPath: img) else {
                    let dest = (try? fm.destinationOfSymbolicLink(atPath: img)) != nil
                    issues.append(DatasetIssue(path: img, reason: dest ? "symlink loop or dangling symlink" : "cannot read file"))
                    continue
                }
                var resolvedType = attrs[.type] as? FileAttributeType
                var size = (attrs[.size] as? NSNumber)?.intValue ?? 0
                if resolvedType == .typeSymbolicLink {
                    // attributesOfItem does not follow links: stat the target (fails with ELOOP on a cycle).
                    var st = stat()
                    if stat(img, &st) != 0 {
                        issues.append(DatasetIssue(path: img, reason: errno == ELOOP ? "symlink loop" : "dangling symlink"))
                        continue
                    }
                    resolvedType = (st.st_mode & S_IFMT) == S_IFDIR ? .typeDirectory : .typeRegular
                    size = Int(st.st_size)
                }
                if resolvedType == .typeDirectory { continue }
                if size == 0 { issues.append(DatasetIssue(path: img, reason: "empty image file (0 bytes)")); continue }
                // kohya read_caption: base + ext, then the face-crop name with the last 4 "_" tokens removed.
                let baseName = (img as NSString).deletingPathExtension
                var candidates = [baseName + s.captionExtension]
                let tokens = baseName.components(separatedBy: "_")
                if tokens.count >= 5 { candidates.append(tokens.dropLast(4).joined(separator: "_") + s.captionExtension) }
                var capPath: String? = nil
                for c in candidates where fm.fileExists(atPath: c) { capPath = c; break }
                if let cp = capPath {
                    if let first = claimed[cp] {
                        issues.append(DatasetIssue(path: img, reason: "shares caption \((cp as NSString).lastPathComponent) with \((first as NSString).lastPathComponent); rename one image"))
                        continue
                    }
                    claimed[cp] = img
                }
                var caption: String? = nil
                var usedPath: String? = nil
                // What an image without a caption trains with (kohya: the class token when there is one).
                let fallback = s.classTokens.map { "trains with class token '\($0)'" } ?? "trains with an empty caption"
                if let cp = capPath {
                    if let data = fm.contents(atPath: cp) {
                        if let text = String(data: data, encoding: .utf8) {
                            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map {
                                $0.trimmingCharacters(in: .whitespacesAndNewlines) }
                            let value = s.enableWildcard ? lines.filter { !$0.isEmpty }.joined(separator: "\n") : (lines.first ?? "")
                            if value.isEmpty {
                                issues.append(DatasetIssue(path: cp, reason: "empty caption: the image \(fallback)", skipped: false))
                            } else { caption = value; usedPath = cp }
                        } else {
                            // kohya opens captions as UTF-8 and stops on a decode error; lora-dist skips the image instead
                            // of training it with a caption it cannot read.
                            issues.append(DatasetIssue(path: img, reason: "its caption \((cp as NSString).lastPathComponent) is not UTF-8 text (re-save it as UTF-8)"))
                            continue
                        }
                    } else {
                        issues.append(DatasetIssue(path: img, reason: "cannot read its caption file \((cp as NSString).lastPathComponent)"))
                        continue
                    }
                } else {
                    // kohya: "No caption file found ... If class token exists, it will be used."
                    missing.append(img)
                    issues.append(DatasetIssue(path: img, reason: "no caption file (\((baseName as NSString).lastPathComponent)\(s.captionExtension)): the image \(fallback)", skipped: false))
                }
                images.append(DatasetImage(path: img, captionPath: usedPath, caption: caption, classToken: s.classTokens,
                                           repeats: s.numRepeats, subset: si))
                used += 1
            }
            try checkCaptionExtension(s, dir: dir, missing: missing, images: used)
        }
        if images.isEmpty {
            let detail = issues.isEmpty ? "" : ":\n" + issues.map { "  \($0)" }.joined(separator: "\n")
            throw DatasetError("\(config.source): no usable image found (extensions .png .jpg .jpeg .webp)\(detail)")
        }
        return DatasetScan(images: images, issues: issues)
    }

    /// kohya's caption-extension traps: `caption_extension = "txt"` (no dot: kohya looks for `imagetxt`) or kohya's
    /// default ".caption" with `.txt` files beside the images make every image train without its caption, and exit 0.
    /// When most of a subset's images have no caption but files with another caption-like extension sit beside them,
    /// stop naming the key and what was found.
    static func checkCaptionExtension(_ s: SubsetConfig, dir: String, missing: [String], images: Int) throws {
        guard images > 0, missing.count * 2 > images else { return }
        let fm = FileManager.default
        var found: [String: [String]] = [:]   // extension → caption files beside the captionless images
        for img in missing {
            let base = (img as NSString).deletingPathExtension
            for ext in [".txt", ".caption", ".tags", ".cap", ".text"] where ext != s.captionExtension {
                if fm.fileExists(atPath: base + ext) { found[ext, default: []].append(base + ext) }
            }
        }
        guard let (ext, files) = found.max(by: { $0.value.count < $1.value.count }), files.count * 2 > missing.count else { return }
        let noDot = !s.captionExtension.hasPrefix(".") && "." + s.captionExtension == ext
        throw DatasetError("caption_extension = \"\(s.captionExtension)\": \(missing.count) of \(images) images in \(dir) have no caption file with that extension, but \(files.count) have a \(ext) file beside them (e.g. \((files[0] as NSString).lastPathComponent))"
            + (noDot ? ". kohya appends the extension as written (\((missing[0] as NSString).deletingPathExtension)\(s.captionExtension)), so it needs its dot" : "")
            + ". Set caption_extension = \"\(ext)\" (or remove those files to train without captions)")
    }

    /// kohya's FineTuningDataset (library/train_util.py): the metadata file maps image keys to {caption, tags,
    /// image_size}, or is JSONL of {image_path, caption, tags, image_size}; a relative key is under the subset's
    /// image_dir. The caption is `caption` (or ""), then — when there are tags — the caption separator and the tags
    /// (with enable_wildcard: the tags after every caption line).
    static func fineTuningImages(_ s: SubsetConfig, subset si: Int, metadata path: String,
                                 issues: inout [DatasetIssue]) throws -> [DatasetImage] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw DatasetError("\(path): no metadata file (in_json / metadata_file names a JSON of captions per image)")
        }
        var entries: [(key: String, md: [String: Any])] = []
        if path.hasSuffix(".jsonl") {
            for (n, line) in String(decoding: data, as: UTF8.self).split(separator: "\n").enumerated()
            where !line.trimmingCharacters(in: .whitespaces).isEmpty {
                guard let md = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any],
                      let key = md["image_path"] as? String else {
                    throw DatasetError("\(path):\(n + 1): not a JSON object with image_path")
                }
                entries.append((key, md))
            }
        } else {
            guard let root = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
                throw DatasetError("\(path): not a JSON object of image key → {caption, tags}")
            }
            for key in root.keys.sorted() {
                guard let md = root[key] as? [String: Any] else { throw DatasetError("\(path): \(key): not an object") }
                entries.append((key, md))
            }
        }
        var images: [DatasetImage] = []
        for (key, md) in entries {
            let absolute: String
            if key.hasPrefix("/") { absolute = key } else {
                guard let dir = s.imageDir else {
                    throw DatasetError("\(path): \(key) is relative, and image_dir (train_data_dir) is not set — kohya requires it too")
                }
                absolute = (dir as NSString).appendingPathComponent(key)
            }
            guard FileManager.default.fileExists(atPath: absolute) else {
                issues.append(DatasetIssue(path: absolute, reason: "listed in \((path as NSString).lastPathComponent) but no such image file"))
                continue
            }
            var caption = md["caption"] as? String ?? ""
            if var tags = md["tags"] as? String {
                if s.enableWildcard {
                    tags = tags.replacingOccurrences(of: "\n", with: s.captionSeparator)
                    caption = caption.split(separator: "\n").filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
                        .map { "\($0)\(s.captionSeparator)\(tags)" }.joined(separator: "\n")
                } else if !tags.isEmpty {
                    caption = (caption.isEmpty ? "" : caption + s.captionSeparator) + tags
                }
            }
            images.append(DatasetImage(path: absolute, captionPath: path, caption: caption, classToken: nil,
                                       repeats: s.numRepeats, subset: si))
        }
        return images
    }
}
