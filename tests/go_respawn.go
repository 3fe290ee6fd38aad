// A fixture of test_go_linking: N goroutines, one after the other, each writing its own
// goroutine id (runtime.Stack's) to a TCP connection, then exiting. With one P, each new
// goroutine reuses the g the last one left (the runtime's free list), so a goroutine id
// cached by the g's address would give every record after the first a stale id.
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
)

func goid() uint64 {
	b := make([]byte, 64)
	b = b[:runtime.Stack(b, false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	n, _ := strconv.ParseUint(string(b[:bytes.IndexByte(b, ' ')]), 10, 64)
	return n
}

func main() {
	runtime.GOMAXPROCS(1)
	n, _ := strconv.Atoi(os.Args[2])
	c, err := net.Dial("tcp", os.Args[1])
	if err != nil {
		panic(err)
	}
	fmt.Println("READY")
	bufio.NewReader(os.Stdin).ReadString('\n') // the probe has found this process
	for i := 0; i < n; i++ {
		done := make(chan struct{})
		go func() {
			fmt.Fprintf(c, "goid=%d;", goid())
			close(done)
		}()
		<-done
		fmt.Fprintf(c, "main=%d;", goid())
	}
	c.Close()
	fmt.Println("DONE")
}
