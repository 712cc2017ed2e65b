/* AMX tile configuration shared by the kernels that use the tile unit (qlinear_amx.c, qlinear_amx_i8.c,
 * lora.c): palette 1, tiles 0-7 of rows[t] rows x colsb[t] bytes. Include under the file's TM_AMX / TM_AMX_I8
 * guard (the intrinsics need the AMX target). */
#ifndef TM_AMX_H
#define TM_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

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

#endif /* TM_AMX_H */
