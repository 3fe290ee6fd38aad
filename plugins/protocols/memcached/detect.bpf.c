// memcached detector, the kernel twin of deeptrace_plugins.protocols.memcached.plugin.detect.
// Binary requests: magic 0x80 and a 24-byte header whose extras length fits the opcode.
// Text commands are lower case words; those below followed by a key byte count anywhere,
// the others (and every reply, text or binary) only on port 11211, except "STORED\r\n"
// and "VALUE <key>". Words are compared as the little-endian number of their bytes
// against the first 8 bytes of the payload (zero past its end).

#define MC_MASK(len) ((len) >= 8 ? ~0ULL : (1ULL << (8 * (len))) - 1)
#define MC_IS(p, w, n, len, val) ((n) >= (len) && ((w) & MC_MASK(len)) == (val))
#define MC_KEYED(p, w, n, len, val) (MC_IS(p, w, n, len, val) && mc_key_byte(p, n, len))

static __always_inline int mc_key_byte(const u8 *p, u32 n, u32 i) {
    return n > i && p[i] > 0x20 && p[i] != 0x7f;
}

static __always_inline int mc_binary(const u8 *p, u32 n, int request) {
    if (n < 24 || p[5] != 0 || p[8] != 0)
        return 0;
    u8 op = p[1], ext = p[4];
    u32 keylen = ((u32)p[2] << 8) | p[3];
    u32 body = ((u32)p[9] << 16) | ((u32)p[10] << 8) | p[11];
    int want;
    if (op == 0x00 || op == 0x04 || op == 0x07 || op == 0x09 || op == 0x0a || op == 0x0b ||
        op == 0x0c || op == 0x0d || op == 0x0e || op == 0x0f || op == 0x10 || op == 0x14 ||
        op == 0x17 || op == 0x19 || op == 0x1a || op == 0x20 || op == 0x21 || op == 0x22)
        want = 0;
    else if (op == 0x01 || op == 0x02 || op == 0x03 || op == 0x11 || op == 0x12 || op == 0x13)
        want = 8;
    else if (op == 0x05 || op == 0x06 || op == 0x15 || op == 0x16)
        want = 20;
    else if (op == 0x1b || op == 0x1c || op == 0x1d || op == 0x1e || op == 0x23 || op == 0x24)
        want = 4;
    else if (op == 0x08 || op == 0x18)
        want = -1;
    else
        return 0;
    if (keylen > 250 || body < ext + keylen)
        return 0;
    if (!request) {
        u32 st = ((u32)p[6] << 8) | p[7];
        return st == 0x00 || st == 0x01 || st == 0x02 || st == 0x03 || st == 0x04 || st == 0x05 ||
               st == 0x06 || st == 0x07 || st == 0x08 || st == 0x09 || st == 0x20 || st == 0x81 ||
               st == 0x82 || st == 0x83 || st == 0x84 || st == 0x85 || st == 0x86;
    }
    return ext == want || (want == -1 && (ext == 0 || ext == 4));
}

static __always_inline int detect_memcached(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    if (l4 != 1 || n < 2)
        return 0;
    int port = lport == 11211 || rport == 11211;
    if (p[0] == 0x80)
        return mc_binary(p, n, 1) ? 1 : 0;
    if (p[0] == 0x81)
        return port && mc_binary(p, n, 0) ? 2 : 0;
    u64 w = 0;
    if (n > 0) w |= (u64)p[0];
    if (n > 1) w |= (u64)p[1] << 8;
    if (n > 2) w |= (u64)p[2] << 16;
    if (n > 3) w |= (u64)p[3] << 24;
    if (n > 4) w |= (u64)p[4] << 32;
    if (n > 5) w |= (u64)p[5] << 40;
    if (n > 6) w |= (u64)p[6] << 48;
    if (n > 7) w |= (u64)p[7] << 56;
    if (
        MC_KEYED(p, w, n, 4, 0x20746567ULL)  /* "get " */ ||
        MC_KEYED(p, w, n, 5, 0x2073746567ULL)  /* "gets " */ ||
        MC_KEYED(p, w, n, 4, 0x20746167ULL)  /* "gat " */ ||
        MC_KEYED(p, w, n, 5, 0x2073746167ULL)  /* "gats " */ ||
        MC_KEYED(p, w, n, 4, 0x20746573ULL)  /* "set " */ ||
        MC_KEYED(p, w, n, 4, 0x20646461ULL)  /* "add " */ ||
        MC_KEYED(p, w, n, 4, 0x20736163ULL)  /* "cas " */ ||
        MC_KEYED(p, w, n, 5, 0x2072636e69ULL)  /* "incr " */ ||
        MC_KEYED(p, w, n, 5, 0x2072636564ULL)  /* "decr " */ ||
        MC_KEYED(p, w, n, 7, 0x20646e65707061ULL)  /* "append " */ ||
        MC_KEYED(p, w, n, 8, 0x20646e6570657270ULL)  /* "prepend " */ ||
        MC_KEYED(p, w, n, 8, 0x206563616c706572ULL)  /* "replace " */)
        return 1;
    if (port && (
        MC_KEYED(p, w, n, 7, 0x206574656c6564ULL)  /* "delete " */ ||
        MC_KEYED(p, w, n, 6, 0x206863756f74ULL)  /* "touch " */ ||
        MC_KEYED(p, w, n, 3, 0x20676dULL)  /* "mg " */ ||
        MC_KEYED(p, w, n, 3, 0x20736dULL)  /* "ms " */ ||
        MC_KEYED(p, w, n, 3, 0x20646dULL)  /* "md " */ ||
        MC_KEYED(p, w, n, 3, 0x20616dULL)  /* "ma " */ ||
        MC_KEYED(p, w, n, 3, 0x20656dULL)  /* "me " */))
        return 1;
    if (port && (
        MC_IS(p, w, n, 8, 0xd6e6f6973726576ULL)  /* "version\r" */ ||
        MC_IS(p, w, n, 7, 0xa0d7374617473ULL)  /* "stats\r\n" */ ||
        MC_IS(p, w, n, 6, 0x207374617473ULL)  /* "stats " */ ||
        MC_IS(p, w, n, 8, 0x6c615f6873756c66ULL)  /* "flush_al" */ ||
        MC_IS(p, w, n, 6, 0xa0d74697571ULL)  /* "quit\r\n" */ ||
        MC_IS(p, w, n, 4, 0xa0d6e6dULL)  /* "mn\r\n" */))
        return 1;
    if (MC_IS(p, w, n, 8, 0xa0d4445524f5453ULL)  /* "STORED\r\n" */ ||
        MC_KEYED(p, w, n, 6, 0x2045554c4156ULL))  /* "VALUE " */
        return 2;
    if (port && (
        MC_IS(p, w, n, 8, 0x524f54535f544f4eULL)  /* "NOT_STOR" */ ||
        MC_IS(p, w, n, 8, 0xa0d535453495845ULL)  /* "EXISTS\r\n" */ ||
        MC_IS(p, w, n, 8, 0x4e554f465f544f4eULL)  /* "NOT_FOUN" */ ||
        MC_IS(p, w, n, 8, 0xd444554454c4544ULL)  /* "DELETED\r" */ ||
        MC_IS(p, w, n, 8, 0xd44454843554f54ULL)  /* "TOUCHED\r" */ ||
        MC_IS(p, w, n, 5, 0xa0d444e45ULL)  /* "END\r\n" */ ||
        MC_IS(p, w, n, 4, 0xa0d4b4fULL)  /* "OK\r\n" */ ||
        MC_IS(p, w, n, 8, 0x204e4f4953524556ULL)  /* "VERSION " */ ||
        MC_IS(p, w, n, 5, 0x2054415453ULL)  /* "STAT " */ ||
        MC_IS(p, w, n, 7, 0xa0d524f525245ULL)  /* "ERROR\r\n" */ ||
        MC_IS(p, w, n, 8, 0x455f544e45494c43ULL)  /* "CLIENT_E" */ ||
        MC_IS(p, w, n, 8, 0x455f524556524553ULL)  /* "SERVER_E" */ ||
        MC_IS(p, w, n, 4, 0xa0d4448ULL)  /* "HD\r\n" */ ||
        MC_IS(p, w, n, 3, 0x204448ULL)  /* "HD " */ ||
        MC_IS(p, w, n, 4, 0xa0d4e45ULL)  /* "EN\r\n" */ ||
        MC_IS(p, w, n, 3, 0x204156ULL)  /* "VA " */ ||
        MC_IS(p, w, n, 4, 0xa0d464eULL)  /* "NF\r\n" */ ||
        MC_IS(p, w, n, 4, 0xa0d534eULL)  /* "NS\r\n" */ ||
        MC_IS(p, w, n, 4, 0xa0d5845ULL)  /* "EX\r\n" */ ||
        MC_IS(p, w, n, 4, 0xa0d4e4dULL)  /* "MN\r\n" */))
        return 2;
    return 0;
}
