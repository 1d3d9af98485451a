#include "CZstd.h"
// zstd is used through its public API directly; this file only makes CZstd a C target.
int lora_zstd_version(void) { return (int)ZSTD_versionNumber(); }
