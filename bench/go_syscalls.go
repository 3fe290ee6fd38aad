// The Go side of bench.bpfcost: after a pause (the agent finds the new process through
// its exec and looks at the binary), N round trips of 64 bytes over a loopback TCP
// connection whose both ends are goroutines of this process: Write + ReadFull each.
package main

import (
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	n, _ := strconv.Atoi(os.Args[1])
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			c.Write(buf)
		}
	}()
	time.Sleep(2 * time.Second)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		c.Write(buf)
		io.ReadFull(c, buf)
	}
	c.Close()
}
