// HTTP/2 detector. Mirrors deeptrace_plugins.protocols.http2.plugin.Http2Protocol.detect:
// the client preface -> request; a non-ACK SETTINGS frame on stream 0 (a server's first
// frame) -> response; a HEADERS frame on an odd stream starting with an indexed :status
// -> response, or an indexed :method GET/POST -> request (connections seen mid-way).

#define HTTP2_SETTINGS_MAX 96

static __always_inline int http2_hpack_first(u8 b)
{
    if (b >= 0x88 && b <= 0x8e)
        return 2;
    if (b == 0x82 || b == 0x83)
        return 1;
    return 0;
}

static __always_inline int detect_http2(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4)
{
    if (l4 != 1 || n < 9)
        return 0;
    if (n >= 24 && p[0] == 'P' && p[1] == 'R' && p[2] == 'I' && p[3] == ' ' &&
        p[4] == '*' && p[5] == ' ' && p[6] == 'H' && p[7] == 'T' && p[8] == 'T' &&
        p[9] == 'P' && p[10] == '/' && p[11] == '2' && p[12] == '.' && p[13] == '0' &&
        p[14] == '\r' && p[15] == '\n' && p[16] == '\r' && p[17] == '\n' &&
        p[18] == 'S' && p[19] == 'M' && p[20] == '\r' && p[21] == '\n' &&
        p[22] == '\r' && p[23] == '\n')
        return 1;
    u32 len = ((u32)p[0] << 16) | ((u32)p[1] << 8) | p[2];
    u8 type = p[3], flags = p[4];
    if (p[5] & 0x80)
        return 0;
    u32 sid = ((u32)p[5] << 24) | ((u32)p[6] << 16) | ((u32)p[7] << 8) | p[8];
    if (type == 4) {
        if (sid || flags || len % 6 || len > HTTP2_SETTINGS_MAX)
            return 0;
        if (len && n >= 11 && p[9] == 0 && p[10] == 0)
            return 0;
        return 2;
    }
    if (type == 1) {
        if (!(sid & 1) || (flags & ~0x2d) || len == 0 || len > 16384)
            return 0;
        // The header block starts after the optional pad length and priority fields.
        if (flags & 0x08) {
            if (flags & 0x20)
                return n > 15 ? http2_hpack_first(p[15]) : 0;
            return n > 10 ? http2_hpack_first(p[10]) : 0;
        }
        if (flags & 0x20)
            return n > 14 ? http2_hpack_first(p[14]) : 0;
        return n > 9 ? http2_hpack_first(p[9]) : 0;
    }
    return 0;
}
