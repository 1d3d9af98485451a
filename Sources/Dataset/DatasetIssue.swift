import Foundation

/// One problem with one input file or folder: the data pipeline reports each as a single line naming the
/// file and the reason, keeps going with the valid inputs, and summarises at the end. Only a dataset with no
/// usable image at all is an error (`DatasetError`).
public struct DatasetIssue: Equatable, CustomStringConvertible, Sendable {
    public let path: String
    public let reason: String
    /// False for a note about a file that is still used (an image that trains with its class token, a small image
    /// upscaled): the words must say what happens.
    public let skipped: Bool
    public init(path: String, reason: String, skipped: Bool = true) { self.path = path; self.reason = reason; self.skipped = skipped }
    public var description: String { skipped ? "skipped \(path): \(reason)" : "\(path): \(reason)" }
}

/// A dataset that cannot be used at all, or a configuration error, naming the file/key/value and what to do.
public struct DatasetError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
