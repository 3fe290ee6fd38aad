// HTTP/1.x detector: a request method and a space, or an HTTP/1.0 / HTTP/1.1 status line.
// Mirrors deeptrace_plugins.protocols.http1.plugin.Http1Protocol.detect.

#define HTTP1_IS_TARGET(c) ((c) >= 0x21 && (c) <= 0x7e)
// method of length L (letters in p[0..L-1]) followed by a space and a target byte
#define HTTP1_TAIL(L) (n > (L) + 1 && p[L] == ' ' && HTTP1_IS_TARGET(p[(L) + 1]))

static __always_inline int detect_http1(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4)
{
    if (l4 != 1 || n < 5)
        return 0;
    switch (p[0]) {
    case 'G':
        if (p[1] == 'E' && p[2] == 'T')
            return HTTP1_TAIL(3) ? 1 : 0;
        return 0;
    case 'P':
        if (p[1] == 'U' && p[2] == 'T')
            return HTTP1_TAIL(3) ? 1 : 0;
        if (p[1] == 'O' && p[2] == 'S' && p[3] == 'T')
            return HTTP1_TAIL(4) ? 1 : 0;
        if (p[1] == 'A' && p[2] == 'T' && p[3] == 'C' && p[4] == 'H')
            return HTTP1_TAIL(5) ? 1 : 0;
        return 0;
    case 'D':
        if (p[1] == 'E' && p[2] == 'L' && p[3] == 'E' && p[4] == 'T' && p[5] == 'E')
            return HTTP1_TAIL(6) ? 1 : 0;
        return 0;
    case 'O':
        if (p[1] == 'P' && p[2] == 'T' && p[3] == 'I' && p[4] == 'O' && p[5] == 'N' &&
            p[6] == 'S')
            return HTTP1_TAIL(7) ? 1 : 0;
        return 0;
    case 'C':
        if (p[1] == 'O' && p[2] == 'N' && p[3] == 'N' && p[4] == 'E' && p[5] == 'C' &&
            p[6] == 'T')
            return HTTP1_TAIL(7) ? 1 : 0;
        return 0;
    case 'T':
        if (p[1] == 'R' && p[2] == 'A' && p[3] == 'C' && p[4] == 'E')
            return HTTP1_TAIL(5) ? 1 : 0;
        return 0;
    case 'H':
        if (p[1] == 'E' && p[2] == 'A' && p[3] == 'D')
            return HTTP1_TAIL(4) ? 1 : 0;
        if (n > 9 && p[1] == 'T' && p[2] == 'T' && p[3] == 'P' && p[4] == '/' &&
            p[5] == '1' && p[6] == '.' && (p[7] == '0' || p[7] == '1') && p[8] == ' ' &&
            p[9] >= '0' && p[9] <= '9')
            return 2;
        return 0;
    }
    return 0;
}
