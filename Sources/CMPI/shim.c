#include "CMPI.h"
MPI_Comm lora_mpi_comm_world(void) { return MPI_COMM_WORLD; }
MPI_Datatype lora_mpi_float(void) { return MPI_FLOAT; }
MPI_Datatype lora_mpi_byte(void) { return MPI_BYTE; }
MPI_Datatype lora_mpi_int64(void) { return MPI_INT64_T; }
MPI_Op lora_mpi_sum(void) { return MPI_SUM; }
MPI_Op lora_mpi_max(void) { return MPI_MAX; }
void *lora_mpi_in_place(void) { return MPI_IN_PLACE; }
int lora_mpi_success(void) { return MPI_SUCCESS; }
int lora_mpi_any_source(void) { return MPI_ANY_SOURCE; }
int lora_mpi_thread_funneled(void) { return MPI_THREAD_FUNNELED; }
