import Foundation

/// Which launcher started this process, as its environment tells (read before MPI_Init: the MPI library may
/// rewrite some of these variables while it initialises).
public enum Launcher: String, Sendable {
    case openMPI = "Open MPI (mpirun/mpiexec)"
    case pmix = "PMIx (srun --mpi=pmix or prun)"
    case hydra = "MPICH/Hydra (mpiexec)"
    case slurm = "Slurm"
    case pbs = "PBS"
    case none = "none"
}

/// What the launcher says about this process before MPI is asked. Every count is optional: a launcher tells
/// what it knows (PMIx exports the rank but not the world size; PBS exports the allocation's slots, not a rank).
public struct LaunchEnvironment: Equatable, Sendable {
    public var launcher: Launcher
    /// Tasks the launcher started (or allocated, for PBS/Slurm batch scripts); nil = not told.
    public var worldSize: Int?
    public var rank: Int?
    /// Tasks on this node and this task's index among them.
    public var localSize: Int?
    public var localRank: Int?
    /// The variables the numbers came from, for messages ("OMPI_COMM_WORLD_SIZE=3").
    public var evidence: String

    public init(launcher: Launcher, worldSize: Int? = nil, rank: Int? = nil, localSize: Int? = nil,
                localRank: Int? = nil, evidence: String = "") {
        self.launcher = launcher; self.worldSize = worldSize; self.rank = rank
        self.localSize = localSize; self.localRank = localRank; self.evidence = evidence
    }

    public static let standalone = LaunchEnvironment(launcher: .none, worldSize: 1, rank: 0, localSize: 1, localRank: 0,
                                                     evidence: "no launcher variables")

    /// Detects the launcher from `env` (pass ProcessInfo's environment; tests pass synthetic ones).
    /// Precedence: the per-process variables of the MPI library that actually launched the rank (Open MPI,
    /// PMIx, Hydra) over the allocation-level ones (Slurm, PBS), because `mpirun` inside a Slurm or PBS job
    /// inherits the allocation's variables too. `readFile` reads PBS_NODEFILE; `hostname` picks this node's lines.
    public static func detect(
        _ env: [String: String],
        readFile: (String) -> String? = { try? String(contentsOfFile: $0, encoding: .utf8) },
        hostname: String = ProcessInfo.processInfo.hostName
    ) throws -> LaunchEnvironment {
        func int(_ name: String) throws -> Int? {
            guard let raw = env[name] else { return nil }
            let text = raw.trimmingCharacters(in: .whitespaces)
            guard let v = Int(text), v >= 0 else {
                throw LaunchError(description:
                    "environment variable \(name)=\"\(raw)\" is not a non-negative integer; the launcher sets it, so unset it or fix the job script")
            }
            return v
        }
        func evidence(_ names: [String]) -> String {
            names.compactMap { n in env[n].map { "\(n)=\($0)" } }.joined(separator: " ")
        }

        // Open MPI's mpirun/mpiexec (also inside Slurm and PBS allocations).
        if env["OMPI_COMM_WORLD_SIZE"] != nil || env["OMPI_COMM_WORLD_RANK"] != nil {
            let names = ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"]
            return try validated(LaunchEnvironment(
                launcher: .openMPI, worldSize: int(names[0]), rank: int(names[1]), localSize: int(names[2]),
                localRank: int(names[3]), evidence: evidence(names)))
        }
        // PMIx (srun --mpi=pmix, prun): the rank is exported, the size comes from Slurm when it is the launcher.
        if env["PMIX_RANK"] != nil {
            var names = ["PMIX_RANK"]
            var l = LaunchEnvironment(launcher: .pmix, rank: try int("PMIX_RANK"))
            if env["SLURM_PROCID"] != nil || env["SLURM_STEP_NUM_TASKS"] != nil || env["SLURM_NTASKS"] != nil {
                let s = try slurm(env, int)
                l.worldSize = s.worldSize; l.localSize = s.localSize; l.localRank = s.localRank
                names += ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"]
            }
            l.evidence = evidence(names)
            return try validated(l)
        }
        // MPICH / Intel MPI Hydra.
        if env["PMI_SIZE"] != nil || env["PMI_RANK"] != nil {
            let names = ["PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"]
            return try validated(LaunchEnvironment(
                launcher: .hydra, worldSize: int(names[0]), rank: int(names[1]), localSize: int(names[2]),
                localRank: int(names[3]), evidence: evidence(names)))
        }
        // Slurm: srun (with SLURM_PROCID per task) or a batch script (the allocation's task count).
        if env["SLURM_NTASKS"] != nil || env["SLURM_PROCID"] != nil || env["SLURM_STEP_NUM_TASKS"] != nil {
            var l = try slurm(env, int)
            l.evidence = evidence(["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                                   "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"])
            return try validated(l)
        }
        // PBS (Torque: PBS_NP, PBS_NUM_PPN; PBS Pro: the node file). No rank: PBS runs the script once.
        if env["PBS_JOBID"] != nil {
            var l = LaunchEnvironment(launcher: .pbs)
            var names = ["PBS_JOBID", "PBS_NP", "PBS_NUM_PPN"]
            l.worldSize = try int("PBS_NP")
            l.localSize = try int("PBS_NUM_PPN")
            if let path = env["PBS_NODEFILE"], let text = readFile(path) {
                names.append("PBS_NODEFILE")
                // One line per slot, the node's name repeated: count all, and this node's.
                let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
                    .filter { !$0.isEmpty }
                if l.worldSize == nil { l.worldSize = lines.count }
                if l.localSize == nil {
                    let short = hostname.split(separator: ".").first.map(String.init) ?? hostname
                    let mine = lines.filter { $0 == hostname || $0.split(separator: ".").first.map(String.init) == short }.count
                    if mine > 0 { l.localSize = mine }
                }
            }
            l.evidence = evidence(names)
            return try validated(l)
        }
        return standalone
    }

    /// Slurm's counts. SLURM_STEP_NUM_TASKS/SLURM_NTASKS give the world; the per-node count comes from
    /// SLURM_NTASKS_PER_NODE when set, else from the compressed list SLURM_(STEP_)TASKS_PER_NODE ("2(x3),1":
    /// three nodes with 2 tasks, then one with 1) at index SLURM_NODEID.
    static func slurm(_ env: [String: String], _ int: (String) throws -> Int?) throws -> LaunchEnvironment {
        var l = LaunchEnvironment(launcher: .slurm)
        l.worldSize = try int("SLURM_STEP_NUM_TASKS") ?? int("SLURM_NTASKS")
        l.rank = try int("SLURM_PROCID")
        l.localRank = try int("SLURM_LOCALID")
        if let perNode = try int("SLURM_NTASKS_PER_NODE") {
            l.localSize = perNode
        } else if let list = env["SLURM_STEP_TASKS_PER_NODE"] ?? env["SLURM_TASKS_PER_NODE"] {
            let counts = try expandSlurmTaskList(list)
            let node = try int("SLURM_NODEID") ?? 0
            if node < counts.count { l.localSize = counts[node] }
        }
        return l
    }

    /// "2(x3),1" → [2, 2, 2, 1].
    public static func expandSlurmTaskList(_ list: String) throws -> [Int] {
        var out: [Int] = []
        for item in list.split(separator: ",") {
            let s = item.trimmingCharacters(in: .whitespaces)
            if let open = s.firstIndex(of: "(") {
                guard s.hasSuffix(")"), let n = Int(s[..<open]),
                      let times = Int(s[s.index(open, offsetBy: 2)..<s.index(before: s.endIndex)]),
                      s[s.index(after: open)] == "x" else {
                    throw LaunchError(description: "Slurm task list \"\(list)\": cannot read \"\(s)\" (expected N or N(xM))")
                }
                out += Array(repeating: n, count: times)
            } else {
                guard let n = Int(s) else {
                    throw LaunchError(description: "Slurm task list \"\(list)\": cannot read \"\(s)\" (expected N or N(xM))")
                }
                out.append(n)
            }
        }
        return out
    }

    static func validated(_ l: LaunchEnvironment) throws -> LaunchEnvironment {
        if let s = l.worldSize, s < 1 {
            throw LaunchError(description: "\(l.launcher.rawValue) reports a world of \(s) tasks (\(l.evidence)); it must be at least 1")
        }
        if let s = l.worldSize, let r = l.rank, r >= s {
            throw LaunchError(description: "\(l.launcher.rawValue) reports rank \(r) in a world of \(s) (\(l.evidence))")
        }
        if let s = l.localSize, let r = l.localRank, r >= s {
            throw LaunchError(description: "\(l.launcher.rawValue) reports local rank \(r) of \(s) on this node (\(l.evidence))")
        }
        return l
    }

    /// Threads for one rank: the node's cores split evenly between the ranks on this node (at least 1).
    public func defaultThreadsPerRank(cores: Int = ProcessInfo.processInfo.activeProcessorCount) -> Int {
        max(1, cores / max(localSize ?? 1, 1))
    }
}

public struct LaunchError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// A started rank: the launcher's view and MPI's, checked against each other.
public struct Launch {
    public let environment: LaunchEnvironment
    public let communicator: MPICommunicator
    public var rank: Int { communicator.rank }
    public var size: Int { communicator.size }

    /// Set to run one rank deliberately inside a Slurm/PBS allocation that has more task slots.
    public static let allowWorldOfOneVariable = "LORA_DIST_ALLOW_WORLD_OF_ONE"

    /// Reads the launcher's variables, initialises MPI, and refuses the world-size trap: the launcher says N
    /// tasks but MPI sees a world of 1 (each of the N processes would train as rank 0 of its own world).
    public static func start(environment env: [String: String] = ProcessInfo.processInfo.environment) throws -> Launch {
        let launch = try LaunchEnvironment.detect(env)
        let comm = try MPICommunicator()
        if let problem = mismatch(launch: launch, mpiRank: comm.rank, mpiSize: comm.size,
                                  allowWorldOfOne: env[allowWorldOfOneVariable] == "1") {
            try? comm.finalize()
            throw LaunchError(description: problem)
        }
        return Launch(environment: launch, communicator: comm)
    }

    /// The check behind `start`, on plain numbers (nil = consistent).
    public static func mismatch(launch: LaunchEnvironment, mpiRank: Int, mpiSize: Int, allowWorldOfOne: Bool = false) -> String? {
        guard let expected = launch.worldSize, expected != mpiSize else {
            if let r = launch.rank, r != mpiRank {
                return "\(launch.launcher.rawValue) says this process is rank \(r) (\(launch.evidence)) but MPI says rank \(mpiRank): the binary and the launcher disagree; start it with the mpirun/mpiexec of the MPI it is linked against"
            }
            return nil
        }
        if mpiSize == 1 {
            if allowWorldOfOne && (launch.launcher == .slurm || launch.launcher == .pbs) { return nil }
            let fix: String
            switch launch.launcher {
            case .slurm, .pmix:
                fix = "under Slurm start the ranks with `srun --mpi=pmix lora-dist …` (check `srun --mpi=list` shows pmix) or with Open MPI's `mpirun` inside the allocation; a plain `srun` without --mpi=pmix, or a batch script calling lora-dist directly, starts unconnected copies. To run a single rank deliberately set \(allowWorldOfOneVariable)=1"
            case .pbs:
                fix = "under PBS start the ranks with `mpiexec -n \(expected) lora-dist …` (Open MPI's, the one this binary is linked against); to run a single rank deliberately set \(allowWorldOfOneVariable)=1"
            default:
                fix = "this binary is linked against Open MPI: start it with that Open MPI's `mpirun -np \(expected)` (a different MPI's launcher, or an Open MPI of another version, gives every process a world of its own), and check `ldd $(which lora-dist) | grep mpi`"
            }
            return "the launcher (\(launch.launcher.rawValue): \(launch.evidence)) started \(expected) tasks but MPI reports a world of 1, so every process would train as rank 0 of its own world. Stopping instead: \(fix)."
        }
        return "the launcher (\(launch.launcher.rawValue): \(launch.evidence)) says \(expected) tasks but MPI reports a world of \(mpiSize); start lora-dist with one launcher and the MPI it is linked against"
    }

    /// Threads per rank: `override` when given, else the node's cores / the ranks on this node.
    public func threadsPerRank(override: Int? = nil) -> Int {
        override ?? environment.defaultThreadsPerRank()
    }

    /// The default thread count for a process that has not started MPI (the executable's --threads default).
    public static func defaultThreadsPerRank(environment env: [String: String] = ProcessInfo.processInfo.environment) -> Int {
        ((try? LaunchEnvironment.detect(env)) ?? .standalone).defaultThreadsPerRank()
    }
}
