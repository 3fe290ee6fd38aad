// Service A as a Go net/http server (bench/topology.py builds it with /usr/bin/go and
// starts it; see its docstring). GET /a/<id> calls B twice with one keep-alive
// http.Client, GET /b/<id> (B then calls Redis and PostgreSQL) and GET /c/<id> (B answers
// at once), in the way --variant says:
//   seq     one call, then the other, from the handler's goroutine
//   fanout  both at once, each from its own goroutine (go func + sync.WaitGroup)
// Without --b it is a back-end itself: /b/<id> and /c/<id> are answered at once (tests).
// Ground truth: one JSON line per request (the id, and each call with the addresses of
// the socket it used), as the Python and Node services write; besides, the goroutine ids
// (from runtime.Stack) and OS threads of the handler and of each call, for the tests.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

var (
	listen  = flag.String("listen", "", "host:port to serve")
	bAddr   = flag.String("b", "", "B's host:port (none: answer /b/ and /c/ at once)")
	logPath = flag.String("log", "", "ground-truth JSON lines")
	variant = flag.String("variant", "seq", "seq | fanout")
	migrate = flag.Bool("migrate", false, "sleep in the handler until on another OS thread")
	pathRe  = regexp.MustCompile(`^/([abc])/([A-Za-z0-9_-]+)$`)
	logMu   sync.Mutex
	logFile *os.File
	client  = &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: 1024, DisableCompression: true}}
)

// goid is the goroutine's id as the runtime prints it ("goroutine 42 [running]:").
func goid() int64 {
	var buf [64]byte
	n := runtime.Stack(buf[:], false)
	f := bytes.Fields(buf[:n])
	if len(f) < 2 {
		return 0
	}
	id, _ := strconv.ParseInt(string(f[1]), 10, 64)
	return id
}

type call struct {
	Proto  string `json:"proto"`
	Op     string `json:"op"`
	Local  string `json:"local,omitempty"`
	Remote string `json:"remote,omitempty"`
	Status int    `json:"status,omitempty"`
	Error  string `json:"error,omitempty"`
	Goid   int64  `json:"goid"`
	Tid    int    `json:"tid"`
}

func get(ctx context.Context, path string) (call, []byte) {
	c := call{Proto: "http1", Op: "GET " + path, Goid: goid(), Tid: syscall.Gettid()}
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		c.Local = info.Conn.LocalAddr().String()
		c.Remote = *bAddr
	}}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), "GET",
		"http://"+*bAddr+path, nil)
	resp, err := client.Do(req)
	if err != nil {
		c.Error = err.Error()
		return c, []byte("{}")
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	c.Status = resp.StatusCode
	return c, body
}

func writeLog(rec map[string]any) {
	line, _ := json.Marshal(rec)
	logMu.Lock()
	logFile.Write(append(line, '\n'))
	logMu.Unlock()
}

func handle(w http.ResponseWriter, r *http.Request) {
	m := pathRe.FindStringSubmatch(r.URL.Path)
	if m == nil || (m[1] == "a") == (*bAddr == "") {
		w.WriteHeader(404)
		w.Write([]byte(`{"error":"not found"}`))
		return
	}
	rid, t0, tid0 := m[2], time.Now().UnixNano(), syscall.Gettid()
	local := ""
	if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		local = a.String()
	}
	rec := map[string]any{"svc": m[1], "id": rid, "pid": os.Getpid(), "tid": tid0,
		"peer": r.RemoteAddr, "local": local, "t0": t0, "goid": goid()}
	body := []byte(fmt.Sprintf(`{"id":%q}`, rid))
	calls := []call{}
	if m[1] == "a" {
		paths := []string{"/b/" + rid, "/c/" + rid}
		results := make([]call, len(paths))
		bodies := make([][]byte, len(paths))
		if *variant == "fanout" {
			var wg sync.WaitGroup
			for i, p := range paths {
				wg.Add(1)
				go func(i int, p string) {
					defer wg.Done()
					results[i], bodies[i] = get(r.Context(), p)
				}(i, p)
			}
			wg.Wait()
		} else {
			for i, p := range paths {
				results[i], bodies[i] = get(r.Context(), p)
			}
		}
		calls, body = results, bodies[0]
	}
	if *migrate { // the response is then written from another thread than the request read
		for i := 0; i < 2000 && syscall.Gettid() == tid0; i++ {
			time.Sleep(100 * time.Microsecond)
		}
	}
	rec["calls"] = calls
	rec["t1"] = time.Now().UnixNano()
	rec["tid_end"] = syscall.Gettid()
	writeLog(rec)
	status := 200
	for _, c := range calls {
		if c.Status != 200 {
			status = 502
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

func main() {
	flag.Parse()
	var err error
	if logFile, err = os.OpenFile(*logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("READY")
	srv := &http.Server{Handler: http.HandlerFunc(handle), IdleTimeout: 60 * time.Second}
	fmt.Fprintln(os.Stderr, srv.Serve(ln))
	os.Exit(1)
}
