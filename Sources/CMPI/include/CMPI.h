// Thin shim over Open MPI. MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, MPI_IN_PLACE, ... are macros over
// Open MPI's global objects, which Swift cannot import: small functions return them.
#ifndef LORA_CMPI_H
#define LORA_CMPI_H
#include <mpi.h>

MPI_Comm lora_mpi_comm_world(void);
MPI_Datatype lora_mpi_float(void);
MPI_Datatype lora_mpi_byte(void);
MPI_Datatype lora_mpi_int64(void);
MPI_Op lora_mpi_sum(void);
MPI_Op lora_mpi_max(void);
void *lora_mpi_in_place(void);
int lora_mpi_success(void);
int lora_mpi_any_source(void);
int lora_mpi_thread_funneled(void);
#endif
