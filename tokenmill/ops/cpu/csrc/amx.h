/* AMX helpers shared by the kernels that use the tile unit (qlinear_amx.c, qlinear_amx_i8.c, lora.c,
 * attention_prefill.c): the tile configuration (palette 1, tiles 0-7 of rows[t] rows x colsb[t] bytes), Linux's
 * permission for tile data (and, from simd.h, tm_transpose16). Include under the file's TM_AMX / TM_AMX_I8 guard
 * (the intrinsics need the AMX target). */
#ifndef TM_AMX_H
#define TM_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "simd.h" /* tm_transpose16 */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tm_tilecfg;

static inline void tm_amx_load_tiles(const uint8_t rows[8], const uint16_t colsb[8]) {
    tm_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = rows[t];
        cfg.colsb[t] = colsb[t];
    }
    _tile_loadconfig(&cfg);
}

/* Asks Linux for the AMX tile-data state (process-wide; needed once before any tile instruction). 1: granted. */
static inline int tm_amx_request_tiles(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}


#endif /* TM_AMX_H */
