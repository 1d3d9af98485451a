#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// This machine's host name (gethostname: no DNS lookup, unlike Foundation's `ProcessInfo.hostName`); "localhost"
/// when it has none. TensorBoard event file names carry it; the overlapped all-reduce's `auto` counts the ranks' hosts.
public enum Host {
    public static func name() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = String(cString: buffer)
        return name.isEmpty ? "localhost" : name
    }
}
