// Thin shim over Open MPI. MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, MPI_IN_PLACE, ... are macros over
// Open MPI's global objects, which Swift cannot import: small inline functions return them.
#ifndef LORA_CMPI_H
#define LORA_CMPI_H
#include <mpi.h>

static inline MPI_Comm lora_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype lora_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype lora_mpi_byte(void) { return MPI_BYTE; }
static inline MPI_Datatype lora_mpi_int64(void) { return MPI_INT64_T; }
static inline MPI_Op lora_mpi_sum(void) { return MPI_SUM; }
static inline MPI_Op lora_mpi_max(void) { return MPI_MAX; }
static inline void *lora_mpi_in_place(void) { return MPI_IN_PLACE; }
static inline int lora_mpi_success(void) { return MPI_SUCCESS; }
static inline int lora_mpi_any_source(void) { return MPI_ANY_SOURCE; }
static inline int lora_mpi_thread_funneled(void) { return MPI_THREAD_FUNNELED; }
static inline int lora_mpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
static inline MPI_Request lora_mpi_request_null(void) { return MPI_REQUEST_NULL; }
#endif
