import Tensor

/// nn.Linear with its weights bound at `<path>.weight` / `<path>.bias`. `path` is the layer's key prefix
/// (LoRA adapters attach by it).
public struct LinearLayer {
    public let path: String
    public let weight: Var      // [out, in]
    public let bias: Var?       // [out]
    public var inFeatures: Int { weight.shape[1] }
    public var outFeatures: Int { weight.shape[0] }

    public init(_ w: WeightScope, _ inFeatures: Int, _ outFeatures: Int, bias: Bool = true) {
        path = w.path
        weight = Var(w.tensor("weight", [outFeatures, inFeatures]))
        self.bias = bias ? Var(w.tensor("bias", [outFeatures])) : nil
        w.record(weightKey: w.key("weight"), kind: .linear(inFeatures: inFeatures, outFeatures: outFeatures))
    }

    /// A layer whose tensors sit beside its path rather than below it: `<scope>.<name>_weight` / `_bias`
    /// (OpenCLIP's fused `attn.in_proj_weight`); its path is `<scope>.<name>`.
    public init(_ w: WeightScope, fused name: String, _ inFeatures: Int, _ outFeatures: Int) {
        let layer = w[name]
        path = layer.path
        weight = Var(w.tensor("\(name)_weight", [outFeatures, inFeatures]))
        bias = Var(w.tensor("\(name)_bias", [outFeatures]))
        layer.record(weightKey: w.key("\(name)_weight"), kind: .linear(inFeatures: inFeatures, outFeatures: outFeatures))
    }

    /// A layer over given tensors (e.g. one slice of a fused projection).
    public init(path: String, weight: Tensor, bias: Tensor?) {
        self.path = path
        self.weight = Var(weight)
        self.bias = bias.map { Var($0) }
    }

    public func callAsFunction(_ t: Tape, _ x: Var) -> Var {
        if let fused = t.adapters?.linear(t, path: path, input: x, weight: weight, bias: bias) { return fused }
        let y = t.linear(x, weight, bias)
        return t.adapters.map { $0.adapt(t, path: path, input: x, output: y) } ?? y
    }
}

/// nn.Conv2d (square kernel 1 or 3).
public struct Conv2dLayer {
    public let path: String
    public let weight: Var      // [out, in, k, k]
    public let bias: Var?
    public let stride: Int
    public let padding: Int

    public init(_ w: WeightScope, _ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1,
                padding: Int? = nil, bias: Bool = true) {
        path = w.path
        weight = Var(w.tensor("weight", [outChannels, inChannels, kernel, kernel]))
        self.bias = bias ? Var(w.tensor("bias", [outChannels])) : nil
        self.stride = stride
        self.padding = padding ?? kernel / 2
        w.record(weightKey: w.key("weight"), kind: .conv(inChannels: inChannels, outChannels: outChannels, kernel: kernel,
                                                          stride: stride, padding: self.padding))
    }

    public func callAsFunction(_ t: Tape, _ x: Var) -> Var {
        let y = t.conv2d(x, weight, bias, stride: stride, padding: padding)
        return t.adapters.map { $0.adapt(t, path: path, input: x, output: y) } ?? y
    }
}

/// nn.GroupNorm (affine).
public struct GroupNormLayer {
    public let weight: Var, bias: Var
    public let groups: Int
    public let eps: Float

    public init(_ w: WeightScope, channels: Int, groups: Int = 32, eps: Float) {
        weight = Var(w.tensor("weight", [channels]))
        bias = Var(w.tensor("bias", [channels]))
        self.groups = groups
        self.eps = eps
    }

    public func callAsFunction(_ t: Tape, _ x: Var) -> Var {
        t.groupNorm(x, groups: groups, weight: weight, bias: bias, eps: eps)
    }
}

/// nn.LayerNorm over the last dimension (affine).
public struct LayerNormLayer {
    public let weight: Var, bias: Var
    public let eps: Float

    public init(_ w: WeightScope, _ features: Int, eps: Float) {
        weight = Var(w.tensor("weight", [features]))
        bias = Var(w.tensor("bias", [features]))
        self.eps = eps
    }

    public func callAsFunction(_ t: Tape, _ x: Var) -> Var { t.layerNorm(x, weight: weight, bias: bias, eps: eps) }
}
