// MySQL / MariaDB detector: the server greeting (sequence id 0, protocol version 10, a
// version string starting with a digit) -> RESPONSE, or a client command packet
// (sequence id 0, a known command byte, a length that matches the data) -> REQUEST, seen
// on connections the agent joined after their handshake. Port 3306 is only a hint, needed
// for the tiny fixed-size commands (PING, QUIT, STMT_CLOSE) that carry nothing to check.
// Text is checked over a short window (MYSQL_SCAN bytes): this runs in every syscall
// program of the probe, so it must stay small.

#define MYSQL_SCAN 20

// Printable ASCII or \t \n \v \f \r: two unsigned compares.
static __always_inline int mysql_text(u8 c) {
    return (u8)(c - 0x20) < 0x5f || (u8)(c - 9) < 5;
}

static __always_inline int mysql_ident(u8 c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '$' || c == '-';
}

static __always_inline int detect_mysql(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4) {
    if (l4 != 1 || n < 5 || p[3] != 0)
        return 0;
    u32 len = p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16);
    u8 cmd = p[4];
    if (len == 0 || len + 4 < n)
        return 0;
    if (cmd == 0x0a) {
        // Greeting: version string (printable, starts with a digit), NUL, thread id...
        if (len < 40 || len > 1024 || n < 8 || p[5] < '1' || p[5] > '9')
            return 0;
        int end = 0;                         // the version string's NUL was seen
#pragma unroll
        for (u32 i = 6; i < MYSQL_SCAN; i++) {
            if (i < n && !end) {
                if (p[i] == 0)
                    end = 1;
                else if (!mysql_text(p[i]))
                    return 0;
            }
        }
        return 2;
    }
    if (cmd == 0x03 || cmd == 0x16) {
        // COM_QUERY (maybe with empty query attributes: 0x00 0x01) / COM_STMT_PREPARE:
        // statement text that starts like SQL.
        if (len < 3 || n < 6)
            return 0;
        u8 c = p[5];
        if (cmd == 0x03 && n >= 8 && c == 0 && p[6] == 1)
            c = p[7];
        else if (n >= 7 && !mysql_text(p[6]))
            return 0;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '(' || c == '/' ||
              c == '-' || c == ' ' || c == '\t' || c == '\n' || c == '\r'))
            return 0;
#pragma unroll
        for (u32 i = 7; i < MYSQL_SCAN; i++) {
            if (i < n && !mysql_text(p[i]))
                return 0;
        }
        return 1;
    }
    if (cmd == 0x17) {                       // COM_STMT_EXECUTE: flags, iteration count 1
        if (len < 10 || n < 14 || p[9] > 0x0f)
            return 0;
        return p[10] == 1 && p[11] == 0 && p[12] == 0 && p[13] == 0 ? 1 : 0;
    }
    if (cmd == 0x02) {                       // COM_INIT_DB: a schema name
        if (len < 2 || len + 4 != n || len > 27)
            return 0;
#pragma unroll
        for (u32 i = 5; i < MYSQL_SCAN; i++) {
            if (i < n && !mysql_ident(p[i]))
                return 0;
        }
        return 1;
    }
    if (lport != 3306 && rport != 3306)
        return 0;
    if ((cmd == 0x0e || cmd == 0x01) && len == 1 && n == 5)   // COM_PING, COM_QUIT
        return 1;
    if (cmd == 0x19 && len == 5 && n == 9)                   // COM_STMT_CLOSE
        return 1;
    return 0;
}
