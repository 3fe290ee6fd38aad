// Redis (RESP) detector, the kernel twin of deeptrace_redis.plugin.detect.
// A command is an array of bulk strings whose first one (the command name) starts with a
// letter: "*<1-3 digits>\r\n$<1-2 digits>\r\n<letter>". Replies alone are too short and
// generic to be sure of ("+OK", ":1", "$5"), so they count only on port 6379; the
// HELLO reply ("*14\r\n$6\r\nserver\r\n" or "%7\r\n$6\r\nserver\r\n") counts anywhere.

static __always_inline int redis_digit(u8 c) { return c >= '0' && c <= '9'; }
static __always_inline int redis_alpha(u8 c) { c |= 0x20; return c >= 'a' && c <= 'z'; }
static __always_inline int redis_upper(u8 c) { return c >= 'A' && c <= 'Z'; }

// p[0] then a count of `a` digits, "\r\n$", a length of `b` digits, "\r\n", the bulk's
// first byte. 0: no; 1: the bulk starts with a letter; 2: the bulk is "server".
static __always_inline int redis_array(const u8 *p, u32 n, int a, int b) {
    int o = 1 + a, q = 1 + a + 3 + b;
    if (n < q + 3)
        return 0;
    if (!redis_digit(p[1]) || (a > 1 && !redis_digit(p[2])) || (a > 2 && !redis_digit(p[3])))
        return 0;
    if (p[o] != '\r' || p[o + 1] != '\n' || p[o + 2] != '$')
        return 0;
    if (!redis_digit(p[o + 3]) || (b > 1 && !redis_digit(p[o + 4])))
        return 0;
    if (p[q] != '\r' || p[q + 1] != '\n')
        return 0;
    if (b == 1 && p[o + 3] == '6' && n >= q + 10 && p[q + 2] == 's' && p[q + 3] == 'e' &&
        p[q + 4] == 'r' && p[q + 5] == 'v' && p[q + 6] == 'e' && p[q + 7] == 'r' &&
        p[q + 8] == '\r' && p[q + 9] == '\n')
        return 2;
    return redis_alpha(p[q + 2]) ? 1 : 0;
}

// "[-]<digits>\r\n" starting at p[start], within the first 32 bytes.
static __always_inline int redis_num_crlf(const u8 *p, u32 n, int start) {
    int seen = 0;
#pragma unroll
    for (int k = 0; k < 24; k++) {
        int pos = start + k;
        if (pos + 1 >= 32 || pos + 1 >= n)
            return 0;
        u8 c = p[pos];
        if (k == 0 && c == '-')
            continue;
        if (redis_digit(c)) {
            seen = 1;
            continue;
        }
        return c == '\r' && p[pos + 1] == '\n' && seen;
    }
    return 0;
}

static __always_inline int detect_redis(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    if (l4 != 1 || n < 3)
        return 0;
    u8 c0 = p[0];
    if (c0 == '*' || c0 == '%') {
        int r = 0;
        r = r ? r : redis_array(p, n, 1, 1);
        r = r ? r : redis_array(p, n, 1, 2);
        r = r ? r : redis_array(p, n, 2, 1);
        r = r ? r : redis_array(p, n, 2, 2);
        r = r ? r : redis_array(p, n, 3, 1);
        r = r ? r : redis_array(p, n, 3, 2);
        if (r == 2)
            return 2;
        if (r == 1 && c0 == '*')
            return 1;
    }
    if (lport != 6379 && rport != 6379)
        return 0;
    if (c0 == '+') {
        if (n >= 5 && p[1] == 'O' && p[2] == 'K' && p[3] == '\r' && p[4] == '\n')
            return 2;
        if (n >= 7 && p[1] == 'P' && p[2] == 'O' && p[3] == 'N' && p[4] == 'G' &&
            p[5] == '\r' && p[6] == '\n')
            return 2;
        if (n >= 9 && p[1] == 'Q' && p[2] == 'U' && p[3] == 'E' && p[4] == 'U' &&
            p[5] == 'E' && p[6] == 'D' && p[7] == '\r' && p[8] == '\n')
            return 2;
        return 0;
    }
    if (c0 == '-')
        return redis_upper(p[1]) && redis_upper(p[2]) ? 2 : 0;
    if (c0 == '$' || c0 == ':' || c0 == '*' || c0 == '%' || c0 == '~' || c0 == '>')
        return redis_num_crlf(p, n, 1) ? 2 : 0;
    if (c0 == '_')
        return p[1] == '\r' && p[2] == '\n' ? 2 : 0;
    if (c0 == '#' && n >= 4)
        return (p[1] == 't' || p[1] == 'f') && p[2] == '\r' && p[3] == '\n' ? 2 : 0;
    return 0;
}
