// PostgreSQL detector. Frontend -> REQUEST: the start-up packet (int32 length, protocol
// 3.0) or SSLRequest / GSSENCRequest (8 bytes), a simple Query ('Q', int32 length, SQL
// text) or a Parse ('P', int32 length, statement name, SQL text). Backend -> RESPONSE only
// when very plausible: an Authentication request ('R' with a known code), ReadyForQuery
// ('Z', length 5, I/T/E alone in the data), an ErrorResponse starting with an English
// severity, or ParseComplete followed by BindComplete. Text is checked over a short
// window (PG_SCAN bytes): this runs in every syscall program of the probe.

#define PG_SCAN 24

// Printable ASCII or \t \n \v \f \r: two unsigned compares.
static __always_inline int postgresql_text(u8 c) {
    return (u8)(c - 0x20) < 0x5f || (u8)(c - 9) < 5;
}

static __always_inline int postgresql_sql_start(u8 c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '(' || c == '/' ||
           c == '-' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static __always_inline u32 postgresql_be32(const u8 *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

static __always_inline int detect_postgresql(const u8 *p, u32 n, u16 lport, u16 rport,
                                             u8 l4) {
    if (l4 != 1 || n < 5)
        return 0;
    u8 t = p[0];
    if (t == 0) {
        if (n < 8)
            return 0;
        u32 len = postgresql_be32(p), code = postgresql_be32(p + 4);
        if ((code == 80877103 || code == 80877104) && len == 8 && n == 8)
            return 1;                             // SSLRequest, GSSENCRequest
        if (code != 196608 || len < n || len > 10000 || len < 9)
            return 0;
        if (n > 8 && !(p[8] >= 'a' && p[8] <= 'z'))
            return 0;                             // parameter names: user, database...
        return 1;
    }
    u32 len = postgresql_be32(p + 1);
    if (len < 4 || p[1] != 0)
        return 0;
    if (t == 'Q') {
        if (len < 6 || n < 6 || len + 1 < n || !postgresql_sql_start(p[5]))
            return 0;
        u32 m = n < len ? n : len;                // the NUL at offset len ends the text
#pragma unroll
        for (u32 i = 5; i < PG_SCAN; i++) {
            if (i < m && !postgresql_text(p[i]))
                return 0;
        }
        return 1;
    }
    if (t == 'P') {
        // Statement name (maybe empty), NUL, query text, NUL, then the int16 parameter
        // count (left out of the window). state: 0 in the name, 1 after its NUL,
        // 2 query text seen.
        if (len < 8 || n < 8)
            return 0;
        u32 m = n < len - 1 ? n : len - 1;        // len - 1: the parameter count
        int state = 0;
#pragma unroll
        for (u32 i = 5; i < PG_SCAN; i++) {
            if (i < m) {
                u8 c = p[i];
                if (c == 0) {
                    if (state == 0)
                        state = 1;
                } else if (!postgresql_text(c)) {
                    return 0;
                } else if (state == 1) {
                    state = 2;
                }
            }
        }
        return state == 2 ? 1 : 0;
    }
    if (t == 'R') {
        if (n < 9 || len < 8 || len > 2048 || p[5] || p[6] || p[7])
            return 0;
        u8 code = p[8];
        if ((code == 0 || code == 2 || code == 3 || code == 7 || code == 9) && len == 8)
            return 2;
        if ((code == 5 && len == 12) || ((code == 10 || code == 11 || code == 12) && len > 8))
            return 2;
        return 0;
    }
    if (t == 'Z')
        return len == 5 && n == 6 && (p[5] == 'I' || p[5] == 'T' || p[5] == 'E') ? 2 : 0;
    if (t == 'E') {
        if (n < 12 || len < 8 || p[5] != 'S')
            return 0;
        if ((p[6] == 'E' && p[7] == 'R' && p[8] == 'R' && p[9] == 'O' && p[10] == 'R' && p[11] == 0) ||
            (p[6] == 'F' && p[7] == 'A' && p[8] == 'T' && p[9] == 'A' && p[10] == 'L' && p[11] == 0) ||
            (p[6] == 'P' && p[7] == 'A' && p[8] == 'N' && p[9] == 'I' && p[10] == 'C' && p[11] == 0))
            return 2;
        return 0;
    }
    if (t == '1') {
        if (n < 10 || len != 4 || p[5] != '2' || p[6] || p[7] || p[8] || p[9] != 4)
            return 0;
        return 2;
    }
    return 0;
}
