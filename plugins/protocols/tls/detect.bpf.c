// TLS handshake detector, the kernel twin of deeptrace_plugins.protocols.tls.plugin.detect.
// A ClientHello (the sender is the client) or a ServerHello with a hello version 3.x:
// either a whole handshake record (type 22, record version 3.0-3.4, a plausible length),
// or, since OpenSSL reads a record's 5-byte header and then its body in two calls, the
// bare hello message that starts the second (its 24-bit length under 2^16, version 3.x).
// Only hellos: application data on a connection whose start was missed is left
// undetected (it is ciphertext, nothing to parse).

static __always_inline int detect_tls(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    if (l4 != 1 || n < 11)
        return 0;
    u8 type = 0;
    if (p[0] == 22) {
        u32 len = ((u32)p[3] << 8) | p[4];
        if (p[1] != 3 || p[2] > 4 || p[9] != 3 || p[10] > 4 || len < 38 || len > 18432)
            return 0;
        type = p[5];
    } else {
        u32 len = ((u32)p[2] << 8) | p[3];
        if (p[1] != 0 || p[4] != 3 || p[5] > 4 || len < 34)
            return 0;
        type = p[0];
    }
    if (type == 1)
        return 1;
    if (type == 2)
        return 2;
    return 0;
}
