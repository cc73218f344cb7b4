// chain: a stdlib-only HTTP(S) service for kspan's Go tests.
//
// It serves GET /work. With -downstream URL it calls that URL from a NEW goroutine (the case
// goroutine parentage must link) and answers with the downstream status; without it, it answers
// 200 "leaf" (after -delay). With -client URL it instead acts as a client: it makes -n requests
// (GET URL?id=i), -c of them at a time, prints one "status body" line each, and exits.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	cert := flag.String("cert", "", "TLS certificate (serve HTTPS when set)")
	key := flag.String("key", "", "TLS key")
	downstream := flag.String("downstream", "", "URL to call from a new goroutine per request")
	client := flag.String("client", "", "act as a client: GET this URL -n times and exit")
	n := flag.Int("n", 1, "client requests")
	c := flag.Int("c", 1, "client requests in flight at once")
	delay := flag.Duration("delay", 0, "leaf: wait this long before answering")
	h2 := flag.Bool("h2", false, "speak HTTP/2 over TLS (ALPN h2), as a server and as a client")
	flag.Parse()

	// Test certificates are self-signed: the chain must not fail on verification.
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: *h2,
	}
	if !*h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}

	if *client != "" {
		// Request i asks for /work?id=i; c goroutines share the n requests.
		ids := make(chan int, *n)
		for i := 0; i < *n; i++ {
			ids <- i
		}
		close(ids)
		var wg sync.WaitGroup
		var mu sync.Mutex
		failed := false
		for w := 0; w < *c; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range ids {
					resp, err := hc.Get(fmt.Sprintf("%s?id=%d", *client, i))
					mu.Lock()
					if err != nil {
						fmt.Fprintln(os.Stderr, "client:", err)
						failed = true
						mu.Unlock()
						continue
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					fmt.Printf("%d %s\n", resp.StatusCode, body)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if failed {
			os.Exit(1)
		}
		return
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/work", func(w http.ResponseWriter, r *http.Request) {
		if *downstream == "" {
			time.Sleep(*delay)
			w.WriteHeader(200)
			io.WriteString(w, "leaf")
			return
		}
		type result struct {
			code int
			err  error
		}
		done := make(chan result, 1)
		go func() {
			// The downstream call carries the id of the request it serves, so a test can pair them.
			resp, err := hc.Get(*downstream + "?id=" + r.URL.Query().Get("id"))
			if err != nil {
				done <- result{0, err}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			done <- result{resp.StatusCode, nil}
		}()
		res := <-done
		if res.err != nil {
			w.WriteHeader(502)
			io.WriteString(w, res.err.Error())
			return
		}
		w.WriteHeader(res.code)
		io.WriteString(w, "via downstream")
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: mux}
	if !*h2 {
		srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	// The test reads the port from this line.
	fmt.Printf("listening %s\n", ln.Addr().String())
	os.Stdout.Sync()
	if *cert != "" {
		err = srv.ServeTLS(ln, *cert, *key)
	} else {
		err = srv.Serve(ln)
	}
	fmt.Fprintln(os.Stderr, "serve:", err)
	os.Exit(1)
}
