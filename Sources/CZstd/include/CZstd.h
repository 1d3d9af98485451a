// Thin shim over libzstd: the Swift side imports only this header.
#ifndef LORA_CZSTD_H
#define LORA_CZSTD_H
#include <zstd.h>
#endif
