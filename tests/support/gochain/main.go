// A Go net/http service for chain tests: GET /chain calls the next hop (if any) with the default
// client (keep-alive, so kspan sees a pooled connection), then answers 200.
package main

import (
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address")
	next := flag.String("next", "", "next hop URL")
	flag.Parse()
	http.HandleFunc("/chain", func(w http.ResponseWriter, r *http.Request) {
		body := "hello from " + os.Args[0] + "\n"
		if *next != "" {
			resp, err := http.Get(*next)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body += string(b)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		io.WriteString(w, body)
	})
	http.HandleFunc("/status/", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/status/"))
		if err != nil {
			code = 400
		}
		w.WriteHeader(code)
	})
	fmt.Println("listening")
	if err := http.ListenAndServe(*listen, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
