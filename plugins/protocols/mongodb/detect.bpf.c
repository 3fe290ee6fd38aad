// MongoDB detector: a 16-byte header (messageLength, requestID, responseTo, opCode, all
// little-endian) with a plausible length and OP_MSG (2013) or OP_QUERY (2004) -> REQUEST
// when responseTo is 0, else RESPONSE; OP_REPLY (1) -> RESPONSE. The bytes after the
// header are checked too (flag bits, section kind, first element / collection name), so
// that a random little-endian integer pattern does not pass.

static __always_inline u32 mongodb_u32(const u8 *p) {
    return p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

static __always_inline int mongodb_name(u8 c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '$' || c == '_';
}

static __always_inline int detect_mongodb(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    if (l4 != 1 || n < 21)
        return 0;
    u32 len = mongodb_u32(p);
    u32 response_to = mongodb_u32(p + 8);
    u32 opcode = mongodb_u32(p + 12);
    if (len < 21 || len > 48000000)
        return 0;
    if (opcode == 2013) {
        // flagBits: only checksumPresent, moreToCome, exhaustAllowed may be set.
        if ((p[16] & ~3) || p[17] || (p[18] & ~1) || p[19])
            return 0;
        if (p[20] == 0) {                       // body: int32 size, first element type+name
            if (n < 27)
                return 0;
            u32 size = mongodb_u32(p + 21);
            if (size < 5 || size > len - 21 || p[25] == 0 || (p[25] > 0x13 && p[25] != 0x7f &&
                p[25] != 0xff) || !mongodb_name(p[26]))
                return 0;
        } else if (p[20] != 1) {
            return 0;
        }
        return response_to == 0 ? 1 : 2;
    }
    if (opcode == 2004) {
        // flags (bits 1..7), then the full collection name "db.collection".
        if ((p[16] & 1) || p[17] || p[18] || p[19] || !mongodb_name(p[20]))
            return 0;
        return response_to == 0 ? 1 : 2;
    }
    if (opcode == 1) {
        // responseFlags (bits 0..3), cursorID...
        if ((p[16] & 0xf0) || p[17] || p[18] || p[19] || n < 36)
            return 0;
        return 2;
    }
    return 0;
}
