/* A tiny MPI program for the netns harness: proves that every "host" ran a rank and that ranks
 * exchanged data over the links. Each rank prints one line
 *     probe rank=R size=S host=<hostname> sum=<Σ over ranks of (rank+1)> bytes=<payload size>
 * after an MPI_Allreduce of a 4 MiB int buffer (large enough that the TCP byte counters on the veths
 * clearly grow: the ring moves about 2×(S-1)/S × 4 MiB per rank).
 * Build: mpicc -O2 -o mpi_probe cluster/netns/mpi_probe.c   (the harness test does this itself). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 0, len = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Get_processor_name(host, &len);

    enum { N = 1 << 20 };               /* 1 Mi ints = 4 MiB */
    int *buf = malloc(sizeof(int) * N);
    if (!buf) { fprintf(stderr, "probe: out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 2); }
    for (int i = 0; i < N; i++) buf[i] = rank + 1;
    MPI_Allreduce(MPI_IN_PLACE, buf, N, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    const int expect = size * (size + 1) / 2;
    for (int i = 0; i < N; i++) {
        if (buf[i] != expect) {
            fprintf(stderr, "probe: rank %d element %d is %d, expected %d\n", rank, i, buf[i], expect);
            MPI_Abort(MPI_COMM_WORLD, 3);
        }
    }
    printf("probe rank=%d size=%d host=%s sum=%d bytes=%zu\n", rank, size, host, buf[0], sizeof(int) * (size_t)N);
    fflush(stdout);
    free(buf);
    MPI_Finalize();
    return 0;
}
