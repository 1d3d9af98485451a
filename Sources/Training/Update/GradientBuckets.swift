import Distributed
import Foundation
import Tensor

/// The gradient all-reduce overlapped with backward (PyTorch DDP's design, issue 14).
///
/// LoRA gradients become final in reverse order of use: the UNet's output blocks first, the text encoders last. The
/// modules are packed, in that expected order, into buckets of about `bucketFloats` values, fixed for the run and the
/// same on every rank (they depend on the network only). During the last micro-step's backward (`Stream`), a module is
/// final once the tape has gone back past its first use in the forward pass (`Tape.position`,
/// `LoRANetwork.firstUse`); when every module of a bucket is final its values are copied out and handed to one
/// communication thread, which reduces the buckets strictly in bucket order (`GradientAllReduce.sum(_:segments:)`)
/// while backward goes on. So the order of every reduction is fixed, whatever the timing, and every rank ends with the
/// same bits; with 2 ranks they are also the bits of one whole-buffer reduction (a + b = b + a). Only the
/// communication thread calls MPI between `Stream.init` and `finish` (MPI_THREAD_SERIALIZED): the main thread is in
/// backward meanwhile.
final class GradientBuckets {
    struct Bucket {
        /// Modules in the bucket.
        let modules: [Int]
        /// Their flat ranges, ascending and merged: the bucket's values are the gradient's values there, in this order.
        let segments: [Range<Int>]
        let count: Int
    }

    let buckets: [Bucket]
    /// Module → its bucket.
    let bucketOf: [Int]
    let reducer: GradientAllReduce
    let network: LoRANetwork

    /// `bucketFloats`: about how many values per bucket (DDP's default is 25 MB: 6.5 M floats).
    init(network: LoRANetwork, reducer: GradientAllReduce, bucketFloats: Int) {
        self.network = network
        self.reducer = reducer
        // Forward order: the text encoders (te1, then te2) condition the UNet; within a model, modules are in the module
        // tree's order, which is the order its forward runs them. Backward finishes them in reverse.
        func forwardRank(_ m: LoRAModel) -> Int {
            switch m { case .textEncoder1: return 0; case .textEncoder2: return 1; case .unet: return 2 }
        }
        let modules = network.modules
        let expected = modules.indices.sorted {
            (forwardRank(modules[$0].model), $0) > (forwardRank(modules[$1].model), $1)
        }
        var buckets: [Bucket] = [], current: [Int] = [], size = 0
        var bucketOf = [Int](repeating: 0, count: modules.count)
        func close() {
            guard !current.isEmpty else { return }
            var segments: [Range<Int>] = []
            for r in current.map({ network.range(ofModule: $0) }).sorted(by: { $0.lowerBound < $1.lowerBound }) {
                if let last = segments.last, last.upperBound == r.lowerBound { segments[segments.count - 1] = last.lowerBound..<r.upperBound }
                else { segments.append(r) }
            }
            for m in current { bucketOf[m] = buckets.count }
            buckets.append(Bucket(modules: current, segments: segments, count: size))
            current = []
            size = 0
        }
        for m in expected {
            current.append(m)
            size += modules[m].parameterCount
            if size >= max(bucketFloats, 1) { close() }
        }
        close()
        self.buckets = buckets
        self.bucketOf = bucketOf
    }

    /// What one overlapped reduction did.
    struct Outcome {
        /// The reducer's statistics summed over buckets (`seconds`: the communication thread's busy time).
        var stats: GradientAllReduce.Stats
        /// Seconds the main thread waited for the reduction after backward: the communication not hidden.
        var exposedSeconds: Double
    }

    /// One optimizer step's overlapped reduction: built right before the last micro-step's forward pass (it turns on
    /// the network's use recording), fed by `progress` during backward, completed by `complete`, collected by `finish`.
    final class Stream {
        private let owner: GradientBuckets
        private let worker: Worker
        /// The forward's first use of each module (`LoRANetwork.firstUse`), and the modules by it, latest first (the
        /// order backward finishes them); `next` indexes `order`.
        private var firstUse: [Int] = []
        private var order: [Int] = []
        private var next = 0
        private var pending: [Int]
        private var submitted: [Bool]
        private var armed = false
        /// Buckets handed to the communication thread while backward was still running (the overlap).
        private(set) var handedOverDuringBackward = 0

        init(_ owner: GradientBuckets) {
            self.owner = owner
            pending = owner.buckets.map(\.modules.count)
            submitted = [Bool](repeating: false, count: owner.buckets.count)
            worker = Worker(reducer: owner.reducer, buckets: owner.buckets)
            owner.network.recordingUses = true
        }

        /// Between forward and backward: stops the use recording and orders the modules for `progress`.
        func forwardDone() {
            owner.network.recordingUses = false
            firstUse = owner.network.firstUse
            order = firstUse.indices.sorted { (firstUse[$0], $0) > (firstUse[$1], $1) }
            next = 0
            armed = true
        }

        /// After each backward operation (`Tape.backward`'s progress): every module first used at a position ≥
        /// `remaining` has its final gradient in `grads`; add it to `gradients` and hand over the buckets it completes.
        func progress(remaining: Int, grads: GradStore, gradients: inout [Float]) {
            guard armed else { return }
            while next < order.count && firstUse[order[next]] >= remaining {
                finalize(order[next], grads: grads, gradients: &gradients)
                next += 1
            }
        }

        /// After backward (or instead of it: no batch on this rank, a non-finite loss): the remaining modules' gradients
        /// from `grads` (when a backward ran), then every bucket not yet handed over.
        func complete(grads: GradStore?, gradients: inout [Float]) {
            owner.network.recordingUses = false
            let finalizeRest = armed
            armed = false   // what is handed over from here on was not overlapped
            if finalizeRest, let grads {
                while next < order.count { finalize(order[next], grads: grads, gradients: &gradients); next += 1 }
            }
            for k in owner.buckets.indices where !submitted[k] { submit(k, gradients) }
        }

        private func finalize(_ m: Int, grads: GradStore, gradients: inout [Float]) {
            owner.network.accumulateGradients(grads, modules: CollectionOfOne(m), into: &gradients)
            let k = owner.bucketOf[m]
            pending[k] -= 1
            if pending[k] == 0 && !submitted[k] {
                if armed { handedOverDuringBackward += 1 }
                submit(k, gradients)
            }
        }

        private func submit(_ k: Int, _ gradients: [Float]) {
            submitted[k] = true
            var values: [Float] = []
            values.reserveCapacity(owner.buckets[k].count)
            for r in owner.buckets[k].segments { values.append(contentsOf: gradients[r]) }
            worker.submit(k, values)
        }

        /// On an error between `init` and `finish`: buckets not yet started are dropped, and this returns once the
        /// communication thread has stopped (it ends the bucket in progress, or times out with the collective timeout),
        /// so that it makes no MPI call while the main thread ends the run.
        func abandon() {
            owner.network.recordingUses = false
            worker.cancel()
        }

        /// Waits for the last bucket and writes the reduced values into `gradients`. Call after `complete`.
        func finish(gradients: inout [Float]) throws -> Outcome {
            let waitStart = DispatchTime.now().uptimeNanoseconds
            let (results, stats) = try worker.finish()
            let exposed = Double(DispatchTime.now().uptimeNanoseconds - waitStart) / 1e9
            for (k, values) in results.enumerated() {
                var at = 0
                for r in owner.buckets[k].segments {
                    for i in r { gradients[i] = values[at]; at += 1 }
                }
            }
            return Outcome(stats: stats, exposedSeconds: exposed)
        }
    }

    /// The communication thread of one stream: reduces bucket 0, 1, … as each arrives.
    private final class Worker: @unchecked Sendable {
        private let cond = NSCondition()
        private var inbox: [Int: [Float]] = [:]
        private var results: [[Float]]
        private var done = false
        private var failure: Error?
        private var cancelled = false
        private var stats: GradientAllReduce.Stats

        init(reducer: GradientAllReduce, buckets: [Bucket]) {
            results = Array(repeating: [], count: buckets.count)
            stats = GradientAllReduce.Stats(algorithm: reducer.algorithm.resolved(format: reducer.format, worldSize: reducer.communicator.size),
                                            bytesSent: 0, rawBytes: 0, seconds: 0)
            let thread = Thread { [self] in self.run(reducer: reducer, buckets: buckets) }
            thread.name = "lora-dist all-reduce"
            thread.start()
        }

        func submit(_ k: Int, _ values: [Float]) {
            cond.lock()
            inbox[k] = values
            cond.signal()
            cond.unlock()
        }

        /// Stops before the next bucket; returns when the thread is done.
        func cancel() {
            cond.lock()
            defer { cond.unlock() }
            cancelled = true
            cond.broadcast()
            while !done { cond.wait() }
        }

        private func run(reducer: GradientAllReduce, buckets: [Bucket]) {
            defer {
                cond.lock()
                done = true
                cond.broadcast()
                cond.unlock()
            }
            for k in buckets.indices {
                cond.lock()
                while inbox[k] == nil && !cancelled { cond.wait() }
                let next = cancelled ? nil : inbox.removeValue(forKey: k)
                cond.unlock()
                guard var values = next else { return }
                do {
                    let s = try reducer.sum(&values, segments: buckets[k].segments)
                    cond.lock()
                    results[k] = values
                    stats.bytesSent += s.bytesSent
                    stats.rawBytes += s.rawBytes
                    stats.seconds += s.seconds
                    cond.unlock()
                } catch {
                    cond.lock()
                    failure = error
                    cond.unlock()
                    return
                }
            }
        }

        func finish() throws -> ([[Float]], GradientAllReduce.Stats) {
            cond.lock()
            defer { cond.unlock() }
            while !done { cond.wait() }
            if let failure { throw failure }
            return (results, stats)
        }
    }
}
