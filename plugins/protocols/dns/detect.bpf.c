// DNS detector, the kernel twin of deeptrace_plugins.protocols.dns.plugin.detect.
// A plausible header: opcode QUERY, Z clear, one question whose first label is <= 63
// bytes; a query (QR 0) also has no answer or authority records, at most two additional
// ones (EDNS OPT, TSIG) and rcode 0. On port 53 that is enough, and QR tells request
// from response. On other ports only queries count, and only strict ones (AA, TC and RA
// clear, a non-empty first label): about 70 fixed bits, which other traffic rarely has.
// Over TCP the header follows the 2-byte length prefix, or starts the data when the
// length went in a syscall of its own (servers often read it separately).

static __always_inline int dns_header(const u8 *p, u32 n, int o, int port53) {
    if (n < o + 13)
        return 0;
    u8 f1 = p[o + 2], f2 = p[o + 3];
    if ((f1 & 0x78) != 0 || (f2 & 0x40) != 0)        // opcode QUERY, Z bit clear
        return 0;
    if (p[o + 4] != 0 || p[o + 5] != 1 || p[o + 12] > 63)
        return 0;
    if (f1 & 0x80)
        return port53 ? 2 : 0;
    if (p[o + 6] || p[o + 7] || p[o + 8] || p[o + 9] || p[o + 10] || p[o + 11] > 2 ||
        (f2 & 0x0f) != 0)
        return 0;
    if (!port53 && ((f1 & 0x06) || (f2 & 0x80) || p[o + 12] == 0))
        return 0;
    return 1;
}

static __always_inline int detect_dns(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    int port53 = lport == 53 || rport == 53;
    if (l4 == 2)
        return dns_header(p, n, 0, port53);
    if (l4 != 1)
        return 0;
    if (n >= 2 && ((p[0] << 8) | p[1]) >= 17) {
        int r = dns_header(p, n, 2, port53);
        if (r)
            return r;
    }
    return dns_header(p, n, 0, port53);
}
