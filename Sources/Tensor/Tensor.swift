/// An n-dimensional, contiguous, row-major array (NCHW for images).
///
/// Tensors are values: operations return new tensors and never write into their inputs. Storage may be
/// fp32, fp16 or bf16; kernels compute in fp32 (widening narrower inputs one operation at a time), except the bf16
/// family's GEMMs and convolutions, which read bf16 and accumulate in fp32 (Kernels.swift).
public struct Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let dtype: DType
    let storage: Storage
    let byteOffset: Int

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }

    /// A zero-filled tensor.
    public init(zeros shape: [Int], dtype: DType = .f32) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        self.shape = shape
        self.dtype = dtype
        self.storage = Storage(byteCount: shape.reduce(1, *) * dtype.byteSize)
        self.byteOffset = 0
    }

    /// An fp32 tensor holding `values` (row-major). `values.count` must equal the shape's element count.
    public init(shape: [Int], _ values: [Float]) {
        precondition(values.count == shape.reduce(1, *),
                     "Tensor(shape: \(shape)) needs \(shape.reduce(1, *)) values, got \(values.count)")
        self.init(uninitialized: shape)
        values.withUnsafeBufferPointer { src in
            mutablePointer.update(from: src.baseAddress!, count: values.count)
        }
    }

    /// A tensor of `dtype` whose elements are the fp32 `values` rounded to that type.
    public init(shape: [Int], _ values: [Float], dtype: DType) {
        let f32 = Tensor(shape: shape, values)
        self = dtype == .f32 ? f32 : f32.converted(to: dtype)
    }

    /// A view of bytes owned elsewhere (e.g. a memory-mapped safetensors file): no copy is made.
    public init(shape: [Int], dtype: DType, storage: Storage, byteOffset: Int) {
        precondition(byteOffset + shape.reduce(1, *) * dtype.byteSize <= storage.byteCount,
                     "tensor view \(shape) \(dtype) at \(byteOffset) exceeds its storage")
        self.shape = shape
        self.dtype = dtype
        self.storage = storage
        self.byteOffset = byteOffset
    }

    /// Owned fp32 storage that the caller fills completely.
    init(uninitialized shape: [Int]) {
        self.shape = shape
        self.dtype = .f32
        self.storage = Storage(uninitializedByteCount: shape.reduce(1, *) * 4)
        self.byteOffset = 0
    }

    /// The elements, widened to fp32, row-major.
    public var scalars: [Float] {
        let n = count
        if n == 0 { return [] }
        return [Float](unsafeUninitializedCapacity: n) { buf, initialized in
            widen(into: buf.baseAddress!)
            initialized = n
        }
    }

    /// Element at a flat (row-major) index, widened to fp32.
    public subscript(flat i: Int) -> Float {
        precondition(i >= 0 && i < count, "flat index \(i) out of range for shape \(shape)")
        let p = storage.bytes + byteOffset
        switch dtype {
        case .f32: return p.assumingMemoryBound(to: Float.self)[i]
        case .f16: return Float(p.assumingMemoryBound(to: Float16.self)[i])
        case .bf16: return floatFromBF16(p.assumingMemoryBound(to: UInt16.self)[i])
        }
    }

    /// The same elements under another shape with the same element count (no copy).
    public func reshaped(_ newShape: [Int]) -> Tensor {
        var newShape = newShape
        if let i = newShape.firstIndex(of: -1) {
            let known = newShape.enumerated().filter { $0.offset != i }.map(\.element).reduce(1, *)
            precondition(known > 0 && count % known == 0, "cannot infer -1 in \(newShape) for \(shape)")
            newShape[i] = count / known
        }
        precondition(newShape.reduce(1, *) == count, "cannot reshape \(shape) to \(newShape)")
        return Tensor(shape: newShape, dtype: dtype, storage: storage, byteOffset: byteOffset)
    }

    /// A copy in another element type (round to nearest even for fp16/bf16).
    public func converted(to target: DType) -> Tensor {
        if target == dtype { return self }
        let n = count
        let out = Tensor(zeros: shape, dtype: target)
        let src = fp32()
        let s = src.pointer
        let d = out.storage.bytes
        switch target {
        case .f32: fatalError("unreachable")
        case .f16:
            let p = d.assumingMemoryBound(to: Float16.self)
            parallelFor(n, grain: 1 << 15) { r in for i in r { p[i] = Float16(s[i]) } }
        case .bf16:
            let p = d.assumingMemoryBound(to: UInt16.self)
            parallelFor(n, grain: 1 << 15) { r in for i in r { p[i] = bf16Bits(s[i]) } }
        }
        return out
    }

    /// This tensor as fp32: itself when already fp32, else a widened copy.
    public func fp32() -> Tensor {
        if dtype == .f32 { return self }
        let out = Tensor(uninitialized: shape)
        widen(into: out.mutablePointer)
        return out
    }

    /// Writes the elements as fp32 into `dst` (count elements).
    func widen(into dst: UnsafeMutablePointer<Float>) {
        let n = count
        let p = storage.bytes + byteOffset
        switch dtype {
        case .f32:
            dst.update(from: p.assumingMemoryBound(to: Float.self), count: n)
        case .f16:
            let s = p.assumingMemoryBound(to: Float16.self)
            parallelFor(n, grain: 1 << 15) { r in for i in r { dst[i] = Float(s[i]) } }
        case .bf16:
            let s = p.assumingMemoryBound(to: UInt16.self)
            parallelFor(n, grain: 1 << 15) { r in for i in r { dst[i] = floatFromBF16(s[i]) } }
        }
    }

    /// fp32 elements (precondition: dtype is fp32). Kernels read through this.
    var pointer: UnsafePointer<Float> {
        precondition(dtype == .f32, "kernel expected an fp32 tensor, got \(dtype); call fp32() first")
        return UnsafePointer((storage.bytes + byteOffset).assumingMemoryBound(to: Float.self))
    }

    /// The elements' bytes, whatever their type (for the oneDNN shim, which is told the type).
    var rawPointer: UnsafeRawPointer { UnsafeRawPointer(storage.bytes + byteOffset) }

    /// fp32 elements for writing: only for tensors a kernel has just created.
    var mutablePointer: UnsafeMutablePointer<Float> {
        precondition(dtype == .f32, "kernel expected an fp32 tensor, got \(dtype)")
        return (storage.bytes + byteOffset).assumingMemoryBound(to: Float.self)
    }

    /// Raw bytes of the elements, in storage order (for writers such as safetensors).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: storage.bytes + byteOffset, count: count * dtype.byteSize))
    }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        let head = scalars.prefix(6).map { String(format: "%.4g", $0) }.joined(separator: ", ")
        return "Tensor(\(shape), \(dtype): [\(head)\(count > 6 ? ", …" : "")])"
    }
}

import Foundation
